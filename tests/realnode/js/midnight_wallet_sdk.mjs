// The Midnight wallet SDK node client (@midnight-ntwrk/wallet-sdk-node-client)
// against the Midnight runtime (read-only).
//
// The package is ESM-only. Its Promise facade (`PolkadotNodeClient.init`) only
// offers transaction submission, which chopsticks cannot execute for this
// runtime (its ledger host functions are missing), so the read-only call is
// made through the package's Effect API: `PolkadotNodeClient.make` (connects,
// loads metadata, disconnects) and `NodeClient.getGenesisTransactions`, which
// reconnects, fetches the genesis block and decodes its
// `midnight.sendMnTransaction` extrinsics. The client opens a fresh WebSocket
// per operation, so this makes two connections to the URL.
//
// A race in the SDK (1.1.2), not in the node: `make` ends with
// `api.disconnect()`, which returns before the WebSocket has finished closing.
// An operation started at once finds the closing socket, takes the error
// "WebSocket is already connected" as a sign that it is connected, sends its
// request, and loses it when the close completes ("disconnected ...: 1000::
// Normal Closure"). A wallet makes its calls long after `make`; this script
// does the same by waiting (bounded) until the first socket is closed.
//
//   node midnight_wallet_sdk.mjs ws://127.0.0.1:PORT
import { NodeClient, PolkadotNodeClient } from '@midnight-ntwrk/wallet-sdk-node-client/effect';
import { Duration, Effect, Layer } from 'effect';

import { hardTimeout, run, urlArg, waitUntil } from './common.mjs';

async function main() {
  const url = urlArg();
  // The SDK retries a failed connection without limit (throwOnConnect: false),
  // and Effect.timeout cannot interrupt its promises: the hard timeout bounds it.
  hardTimeout(45, `midnight_wallet_sdk against ${url}`);

  const config = {
    nodeURL: new URL(url),
    reconnectionTimeout: Duration.seconds(20),
    reconnectionDelay: Duration.millis(500),
  };
  const program = Effect.gen(function* () {
    const client = yield* PolkadotNodeClient.make(config);
    yield* Effect.promise(() => waitUntil(() => !client.api.isConnected, 10, 'first socket closed'));
    const genesis = yield* NodeClient.getGenesisTransactions().pipe(
      Effect.provide(Layer.succeed(NodeClient.NodeClient, client)),
    );
    return {
      specName: client.api.runtimeVersion.specName.toString(),
      specVersion: client.api.runtimeVersion.specVersion.toNumber(),
      genesisHash: client.api.genesisHash.toHex(),
      hasMidnightTx: typeof client.api.tx.midnight?.sendMnTransaction === 'function',
      genesisTransactions: genesis.transactions.length,
      genesisTransactionBytes: genesis.transactions.map((tx) => tx.length),
    };
  }).pipe(Effect.scoped);
  return Effect.runPromise(program);
}

run(main);
