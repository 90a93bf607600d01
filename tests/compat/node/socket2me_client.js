// A scriptable Socket2me client on the real socket.io-client 4.x, used by
// tests/compat/test_socket2me_node.py. It connects as the Socket2me README does:
//
//   const socket = io(server + '/' + token);
//   socket.on('request', (req, respond) => respond(200, 'hello'));
//
// Usage: node socket2me_client.js SERVER TOKEN [--name NAME] [--transport polling|websocket]
//
// Every lifecycle event is printed as one JSON line on stdout. Each request is answered
// according to its own path (req.url), so that a test can drive every case:
//   (root), echo/...    respond(200, <the payload, rawBody in base64>)
//   respond/<case>      one of the respond() argument forms below
//   status/<n>          respond(n)
//   slow/<ms>           respond(200, {url, query}) after <ms> milliseconds
//   never               no answer at all
// The process exits after a disconnect or a connect_error, or when its stdin closes.
'use strict';

const { io } = require('socket.io-client');

const [server, token, ...rest] = process.argv.slice(2);
const opts = {};
for (let i = 0; i < rest.length; i += 2) opts[rest[i].replace(/^--/, '')] = rest[i + 1];
const name = opts.name || 'node';

const print = (obj) => process.stdout.write(JSON.stringify({ name, ...obj }) + '\n');
const exit = () => process.stdout.write('', () => process.exit(0));

const socket = io(server + '/' + token, {
  reconnection: false,
  ...(opts.transport ? { transports: [opts.transport] } : {}),
});

const typeName = (x) =>
  Buffer.isBuffer(x) ? 'Buffer' : x instanceof ArrayBuffer ? 'ArrayBuffer' : typeof x;

const RESPONDS = {
  full: (respond) => respond(201, 'text', { 'X-Test': 'a' }),
  'body-only': (respond) => respond('only body'),
  object: (respond) => respond({ a: 1 }),
  array: (respond) => respond([1, 2]),
  'status-only': (respond) => respond(204),
  null: (respond) => respond(200, null),
  nothing: (respond) => respond(),
  binary: (respond, req) => respond(Buffer.from(req.rawBody)),
  'bad-headers': (respond) => respond(200, 'x', 'not-an-object'),
  'content-type': (respond) => respond(200, '<a/>', { 'Content-Type': 'application/xml' }),
  'list-header': (respond) => respond(200, 'x', { 'X-Multi': ['a', 'b'] }),
};

socket.on('connect', () => print({ event: 'connect', transport: socket.io.engine.transport.name }));
socket.on('connect_error', (err) => {
  print({ event: 'connect_error', message: err.message });
  exit();
});
socket.on('disconnect', (reason) => {
  print({ event: 'disconnect', reason });
  exit();
});

socket.on('request', (req, respond) => {
  print({ event: 'request', method: req.method, url: req.url });
  const [head, arg] = (req.url || '').split(/\/(.*)/s);
  if (head === '' || head === 'echo') {
    const payload = { ...req, rawBody: Buffer.from(req.rawBody).toString('base64') };
    respond(200, payload, { 'X-Client-Name': name, 'X-RawBody-Type': typeName(req.rawBody) });
  } else if (head === 'respond' && RESPONDS[arg]) {
    RESPONDS[arg](respond, req);
  } else if (head === 'status') {
    respond(Number(arg));
  } else if (head === 'slow') {
    setTimeout(() => respond(200, { url: req.url, query: req.query }), Number(arg));
  } else if (head !== 'never') {
    respond(400, 'unknown test path: ' + req.url);
  }
});

process.stdin.on('end', () => {
  socket.disconnect();
  exit();
});
process.stdin.resume();
