// @polkadot/api against the Midnight runtime (read-only): connect, load the
// metadata and runtime version, and report what a wallet would check first.
//
//   node midnight_metadata.mjs ws://127.0.0.1:PORT
import { ApiPromise, WsProvider } from '@polkadot/api';

import { hardTimeout, run, urlArg, withTimeout } from './common.mjs';

async function main() {
  const url = urlArg();
  hardTimeout(60, `midnight_metadata against ${url}`);

  const provider = new WsProvider(url, 1000);
  const api = await withTimeout(
    ApiPromise.create({ provider, throwOnConnect: true, noInitWarn: true }),
    40,
    'ApiPromise.create',
  );
  try {
    const pallets = api.runtimeMetadata.asLatest.pallets.map((p) => p.name.toString());
    const [chain, header] = await Promise.all([api.rpc.system.chain(), api.rpc.chain.getHeader()]);
    return {
      specName: api.runtimeVersion.specName.toString(),
      specVersion: api.runtimeVersion.specVersion.toNumber(),
      metadataVersion: api.runtimeMetadata.version,
      palletCount: pallets.length,
      pallets,
      genesisHash: api.genesisHash.toHex(),
      chain: chain.toString(),
      headNumber: header.number.toNumber(),
      hasMidnightTx: typeof api.tx.midnight?.sendMnTransaction === 'function',
    };
  } finally {
    await api.disconnect();
  }
}

run(main);
