// Shared helpers of the real-node client scripts.
//
// Every script takes the node (or relay) WebSocket URL as its first argument,
// prints exactly one line `RESULT {json}` on success and exits 0; on failure
// it prints `ERROR message` to stderr and exits non-zero. The Python tests in
// tests/realnode/ parse the RESULT line. A hard timeout bounds every script,
// whatever the client library does (WsProvider, for one, retries forever).
//
// The scripts import the packages installed by scripts/setup-realnode.sh into
// .realnode/node_modules; tests/realnode/conftest.py copies this folder's
// *.mjs into .realnode/js/ and runs them from there so that Node's ESM
// resolution finds those packages. By hand:
//   mkdir -p .realnode/js && cp tests/realnode/js/*.mjs .realnode/js/
//   node .realnode/js/polkadot_transfer.mjs ws://127.0.0.1:PORT

import { inspect } from 'node:util';

export const RESULT_PREFIX = 'RESULT ';

/** The URL argument, or exit 2 with a usage line. */
export function urlArg() {
  const url = process.argv[2];
  if (!url || !/^wss?:\/\//.test(url)) {
    fail(`usage: node ${process.argv[1]} ws://HOST:PORT[/PATH]`, 2);
  }
  return url;
}

/** Print the error and exit non-zero (default 1). */
export function fail(message, code = 1) {
  process.stderr.write(`ERROR ${message}\n`);
  process.exit(code);
}

/** Kill the process after `seconds`, whatever is pending; returns a cancel function. */
export function hardTimeout(seconds, what) {
  const timer = setTimeout(() => fail(`timed out after ${seconds} s: ${what}`, 3), seconds * 1000);
  timer.unref();
  return () => clearTimeout(timer);
}

/** Reject after `seconds` unless `promise` settles first. */
export function withTimeout(promise, seconds, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${seconds} s: ${what}`)), seconds * 1000);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Resolve once `predicate()` is true (polled every 20 ms); reject after `seconds`. */
export function waitUntil(predicate, seconds, what) {
  const deadline = Date.now() + seconds * 1000;
  return new Promise((resolve, reject) => {
    const poll = () => {
      if (predicate()) resolve();
      else if (Date.now() > deadline) reject(new Error(`timed out after ${seconds} s: ${what}`));
      else setTimeout(poll, 20);
    };
    poll();
  });
}

/** Print the single result line (BigInt-safe) and exit 0. */
export function succeed(result) {
  const text = JSON.stringify(result, (_, v) => (typeof v === 'bigint' ? v.toString() : v));
  process.stdout.write(`${RESULT_PREFIX}${text}\n`);
  process.exit(0);
}

/** Run `main`, turning any rejection into a clean non-zero exit. */
export function run(main) {
  main().then(succeed, (err) => fail(err instanceof Error ? err.stack : inspect(err, { depth: 3 })));
}
