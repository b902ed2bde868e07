// Preloaded into the unmodified @y/websocket-server (`node --import ./observe.mjs server.js`):
// reports, as JSON lines on stdout, the port it listens on and every websocket upgrade it receives.
import http from 'node:http'

const report = (event) => process.stdout.write(JSON.stringify(event) + '\n')
const emit = http.Server.prototype.emit
let upgrades = 0

http.Server.prototype.emit = function (name, ...args) {
  if (name === 'listening') {
    report({ event: 'listening', port: this.address().port })
  } else if (name === 'upgrade') {
    const [request, socket] = args
    const id = ++upgrades
    report({ event: 'upgrade', id, url: request.url, headers: request.headers })
    socket.once('close', () => report({ event: 'upgrade-closed', id }))
  }
  return emit.call(this, name, ...args)
}

// The test holds our stdin: when it goes away (even by a crash), so do we.
process.stdin.on('end', () => process.exit(0))
process.stdin.resume()
