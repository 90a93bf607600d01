// A Socket2me client in Node: take a token, print the public URL, answer every request.
//
//   npm install socket.io-client@4
//   node examples/socket2me/client.js http://localhost:8080
//
// Node 18 or newer (for fetch). This is the whole protocol.
const { io } = require('socket.io-client');

const server = process.argv[2] || 'http://localhost:8080';

async function main() {
  const token = await (await fetch(`${server}/new`)).json(); // the token is a JSON string
  console.log(`public URL: ${server}/go/${token}/`);

  const socket = io(`${server}/${token}`); // reconnects on its own, to the same token

  // req: headers, method, url (absent at the root), query, body, rawBody (a Buffer)
  socket.on('request', (req, respond) => {
    const path = req.url || '';
    console.log(`${req.method} /${path} ${JSON.stringify(req.query)}`);
    respond(200, `Hello from behind NAT: ${req.method} /${path}`, { 'X-Example': 'js' });
  });

  // Tokens expire after 6 hours unless refreshed; refresh well before that.
  setInterval(() => fetch(`${server}/refresh/${token}`), 3600 * 1000);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
