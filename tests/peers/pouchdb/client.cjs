// A real PouchDB client of a remote database (through the sidecar), authenticated by a session
// cookie, as a browser or app uses it.
// Usage: node client.cjs <db url> <Cookie value> <mode> [since]
//   replicate: live pull replication into an in-memory PouchDB
//   changes:   live changes of the remote after `since` (default now), with their documents
// Reports JSON lines on stdout: {"event":"change","ids":[...]}, {"event":"error",...},
// {"event":"complete"}, and answers {"cmd":"ids"} on stdin with {"event":"ids","ids":[...]}
// (the local database's ids). Exits when stdin closes.
'use strict';
const readline = require('node:readline');
const PouchDB = require('pouchdb-core')
  .plugin(require('pouchdb-adapter-memory'))
  .plugin(require('pouchdb-adapter-http'))
  .plugin(require('pouchdb-replication'));

const [remoteUrl, cookie, mode, since = 'now'] = process.argv.slice(2);
const say = (event) => process.stdout.write(JSON.stringify(event) + '\n');

const remote = new PouchDB(remoteUrl, {
  skip_setup: true,
  fetch: (url, opts) => {
    opts.headers.set('Cookie', cookie);
    return PouchDB.fetch(url, opts);
  },
});
const local = new PouchDB('local', { adapter: 'memory' });

const feed = mode === 'changes'
  ? remote.changes({ live: true, include_docs: true, since, heartbeat: 1000 })
    .on('change', (change) => say({ event: 'change', ids: [change.id] }))
  : PouchDB.replicate(remote, local, { live: true, retry: false, heartbeat: 1000 })
    .on('change', (info) => say({ event: 'change', ids: info.docs.map((d) => d._id) }))
    .on('active', () => say({ event: 'active' }))
    .on('paused', (err) => say({ event: 'paused', error: err ? String(err) : null }));
feed
  .on('error', (err) => say({ event: 'error', status: err.status || null, error: err.message || err.reason || null }))
  .on('complete', (info) => say({ event: 'complete', status: info.status || null }));

readline.createInterface({ input: process.stdin })
  .on('line', async (line) => {
    const cmd = JSON.parse(line).cmd;
    if (cmd === 'ids') {
      const all = await local.allDocs();
      say({ event: 'ids', ids: all.rows.map((r) => r.id) });
    }
  })
  .on('close', () => {
    feed.cancel();
    process.exit(0);
  });
