// A real Yjs client (y-websocket's WebsocketProvider over the `ws` package) for the e2e tests.
// Reports JSON lines on stdout; takes JSON-line commands on stdin: {"op":"insert","text":...}.
//
//   node client.mjs --url ws://127.0.0.1:PORT/db --room room1 [--cookie NAME=VALUE] [--bearer T]
//
// Exit status: 0 stdin closed or {"op":"exit"}; 2 bad arguments; 3 the upgrade was refused with
// an HTTP status; 4 the server closed the connection for good (1008, 4400-4499); 5 other error.
import { parseArgs } from 'node:util'
import { createInterface } from 'node:readline'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

const report = (event) => process.stdout.write(JSON.stringify(event) + '\n')

let args
try {
  args = parseArgs({
    options: {
      url: { type: 'string' },
      room: { type: 'string' },
      cookie: { type: 'string' },
      bearer: { type: 'string' }
    }
  }).values
  if (!args.url || !args.room) throw new Error('--url and --room are required')
} catch (error) {
  report({ event: 'usage', message: error.message })
  process.exit(2)
}

const headers = {}
if (args.cookie) headers.Cookie = args.cookie
if (args.bearer) headers.Authorization = `Bearer ${args.bearer}`

// The browser WebSocket API cannot send headers; `ws` can, through its options argument.
class AuthenticatedWebSocket extends WebSocket {
  constructor (url, protocols) {
    super(url, protocols, { headers })
  }
}

const doc = new Y.Doc()
const text = doc.getText('shared')
const provider = new WebsocketProvider(args.url, args.room, doc, {
  WebSocketPolyfill: AuthenticatedWebSocket,
  disableBc: true, // sync only over the websocket, never between processes some other way
  maxBackoffTime: 500,
  // 1008 (RFC 6455 7.4.1 policy violation) is how the sidecar says "your access was revoked".
  shouldReconnect: (event) => !(event.code === 1008 || (event.code >= 4400 && event.code < 4500))
})

let finished = false
const finish = (status) => {
  if (finished) return
  finished = true
  provider.destroy()
  doc.destroy()
  process.stdout.write('', () => process.exit(status))
}

provider.on('status', ({ status }) => report({ event: 'status', status }))
provider.on('sync', (synced) => { if (synced) report({ event: 'synced' }) })
provider.on('connection-close', (event) => {
  if (event !== null) report({ event: 'connection-close', code: event.code, reason: event.reason })
})
provider.on('closed', ({ code, reason }) => {
  report({ event: 'closed', code, reason })
  finish(4)
})
// The first failure ends the client: y-websocket would otherwise retry forever.
provider.on('connection-error', (event) => {
  const message = String(event.message ?? event.error?.message ?? event)
  const match = /Unexpected server response: (\d{3})/.exec(message)
  if (match) {
    report({ event: 'refused', status: Number(match[1]) })
    finish(3)
  } else {
    report({ event: 'error', message })
    finish(5)
  }
})
text.observe((event) => {
  report({ event: 'text', text: text.toString(), origin: event.transaction.local ? 'local' : 'remote' })
})

const commands = createInterface({ input: process.stdin })
commands.on('line', (line) => {
  let command
  try {
    command = JSON.parse(line)
  } catch {
    report({ event: 'usage', message: `not JSON: ${line}` })
    return
  }
  if (command.op === 'insert') {
    text.insert(text.length, String(command.text))
  } else if (command.op === 'exit') {
    finish(0)
  } else {
    report({ event: 'usage', message: `unknown op: ${command.op}` })
  }
})
// The test holds our stdin: when it goes away (even by a crash), so do we.
commands.on('close', () => finish(0))
