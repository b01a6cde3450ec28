// @polkadot/api against the solochain: subscribe to new heads, sign and send
// Balances.transferKeepAlive from //Alice to //Bob, wait until finalized
// (chopsticks' Instant mode finalizes each block it builds), then report.
//
//   node polkadot_transfer.mjs ws://127.0.0.1:PORT
import { ApiPromise, WsProvider } from '@polkadot/api';
import { Keyring } from '@polkadot/keyring';
import { cryptoWaitReady } from '@polkadot/util-crypto';

import { hardTimeout, run, urlArg, waitUntil, withTimeout } from './common.mjs';

const AMOUNT = 2_000_000_000_000n; // 2 UNIT (12 decimals)

async function main() {
  const url = urlArg();
  hardTimeout(60, `polkadot_transfer against ${url}`);
  await cryptoWaitReady();

  const provider = new WsProvider(url, 1000);
  const api = await withTimeout(
    ApiPromise.create({ provider, throwOnConnect: true, noInitWarn: true }),
    30,
    'ApiPromise.create',
  );
  try {
    const heads = [];
    let firstHead;
    const gotHead = new Promise((resolve) => (firstHead = resolve));
    const unsubHeads = await api.rpc.chain.subscribeNewHeads((header) => {
      heads.push({ number: header.number.toNumber(), hash: header.hash.toHex() });
      firstHead();
    });
    await withTimeout(gotHead, 20, 'first new head');

    const keyring = new Keyring({ type: 'sr25519' });
    const alice = keyring.addFromUri('//Alice');
    const bob = keyring.addFromUri('//Bob');
    const bobBefore = (await api.query.system.account(bob.address)).data.free.toBigInt();

    const tx = api.tx.balances.transferKeepAlive(bob.address, AMOUNT);
    let unsubTx;
    const finalized = new Promise((resolve, reject) => {
      let inBlock = null;
      tx.signAndSend(alice, (result) => {
        const { status, events, dispatchError } = result;
        if (dispatchError) {
          reject(new Error(`dispatch error: ${dispatchError.toString()}`));
        } else if (status.isInBlock) {
          inBlock = status.asInBlock.toHex();
        } else if (status.isFinalized) {
          resolve({
            inBlock,
            finalized: status.asFinalized.toHex(),
            txHash: result.txHash.toHex(),
            events: events.map(({ event }) => `${event.section}.${event.method}`),
          });
        } else if (status.isInvalid || status.isDropped || status.isUsurped) {
          reject(new Error(`transaction ${status.type}`));
        }
      })
        .then((unsub) => (unsubTx = unsub))
        .catch(reject);
    });
    const outcome = await withTimeout(finalized, 30, 'transfer finalized');
    if (unsubTx) unsubTx();
    // the head notification of that block may trail the finalized status
    await waitUntil(
      () => heads.some((h) => h.hash === outcome.finalized),
      10,
      'new head for the transfer block',
    );

    const block = await api.rpc.chain.getBlock(outcome.finalized);
    const bobAfter = (await api.query.system.account(bob.address)).data.free.toBigInt();
    unsubHeads();
    return {
      specName: api.runtimeVersion.specName.toString(),
      heads,
      blockHash: outcome.finalized,
      inBlockHash: outcome.inBlock,
      blockNumber: block.block.header.number.toNumber(),
      txHash: outcome.txHash,
      events: outcome.events,
      amount: AMOUNT,
      bobBefore,
      bobAfter,
    };
  } finally {
    await api.disconnect();
  }
}

run(main);
