// express-pouchdb (CouchDB's HTTP API, _changes feeds included) over in-memory PouchDB, on
// 127.0.0.1. Prints {"port": N} on stdout once listening; exits when stdin closes, so a
// crashed test leaves no orphan.
'use strict';
const express = require('express');
const expressPouchDB = require('express-pouchdb');
const PouchDB = require('pouchdb-core')
  .plugin(require('pouchdb-adapter-memory'))
  .plugin(require('pouchdb-adapter-http'))
  .plugin(require('pouchdb-mapreduce'))
  .plugin(require('pouchdb-replication'));

const app = express();
app.use('/', expressPouchDB(PouchDB.defaults({ adapter: 'memory' }), {
  mode: 'minimumForPouchDB',
  inMemoryConfig: true,
  logPath: '/dev/null',
}));
const server = app.listen(Number(process.env.POUCHDB_PORT || 0), '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
});
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
