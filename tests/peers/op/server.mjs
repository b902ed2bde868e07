// A real OpenID Provider (npm `oidc-provider`) for the sidecar's tests, bound to 127.0.0.1 only.
// Development-only settings: http issuer on loopback, dev login/consent forms that accept any user.
//
// Usage:  node server.mjs [--port N] [--config JSON]      (or env OP_PORT / OP_CONFIG)
//   --port 0 picks a free port. Once listening, ONE line of JSON goes to stdout:
//   {"issuer": "http://127.0.0.1:PORT", "port": PORT}
//
// Config JSON (every key optional):
//   clients: [{client_id, client_secret, redirect_uris, grant_types?, response_types?,
//              post_logout_redirect_uris?, backchannel_logout_uri?,
//              backchannel_logout_session_required?,
//              token_endpoint_auth_method? ("client_secret_basic" | "client_secret_post" | "none"),
//              id_token_signed_response_alg? ("RS256" | "PS256" | "ES256" | "EdDSA" | "Ed25519")}]
//            grant_types default to [authorization_code, refresh_token], response_types to [code].
//   users:   {"<username>": {<claim>: value, ...}}  merged over the default claims of that username;
//            a null value removes the claim. Any claim named here is released in the ID token.
//   id_token_ttl (3600), access_token_ttl (3600), refresh_token_ttl (14 days), session_ttl (14 days)
//   rotate_refresh_tokens (true): every refresh_token grant returns a NEW refresh token and the
//            used one stops working; false keeps the same refresh token for its whole life.
//   registration_token: when set, dynamic client registration (POST /reg, RFC 7591) is enabled
//            for callers presenting it as a Bearer token, and it honours the client_id and
//            client_secret in the request body, so a test can add a client whose redirect_uri is
//            only known once its sidecar is listening.
//            With it, GET /_test/grants?client_id=ID (same Bearer token) answers how many token
//            requests that client made, by grant type and outcome:
//            {"refresh_token": {"success": 1, "error": 0}, ...}, so tests count provider calls.
//
// Behaviour worth knowing:
//   - Any username logs in (the password is not checked): sub = username.
//   - Claims email/email_verified come with scope `email`; name/preferred_username with `profile`;
//     roles, channels, employee_number and every custom claim with `openid`. All of them go into
//     the ID token itself (conformIdTokenClaims: false).
//   - A refresh token is issued on EVERY code exchange for clients allowed the refresh_token grant
//     (no need for offline_access / prompt=consent).
//   - PKCE: S256 only (the library knows no other method); required for public clients
//     (token_endpoint_auth_method "none"), optional for confidential ones.
//   - Keys: fresh RSA-2048, EC P-256 and Ed25519 signing keys at every start (see /jwks).
//   - Exits on SIGTERM/SIGINT, and when stdin reaches EOF if stdin is not a terminal, so a parent
//     holding a pipe to our stdin never leaves an orphan behind.

import { createHash, generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const DAY = 24 * 60 * 60;

function readOptions() {
  const { values } = parseArgs({
    options: { port: { type: 'string' }, config: { type: 'string' } },
    strict: true,
  });
  const port = Number(values.port ?? process.env.OP_PORT ?? '0');
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`invalid port: ${values.port ?? process.env.OP_PORT}`);
  }
  const config = JSON.parse(values.config ?? process.env.OP_CONFIG ?? '{}');
  return { port, config };
}

function generateJwks() {
  const key = (type, options) => {
    const jwk = generateKeyPairSync(type, options).privateKey.export({ format: 'jwk' });
    jwk.kid = `${type}-${randomBytes(6).toString('hex')}`;
    jwk.use = 'sig';
    return jwk;
  };
  return {
    keys: [
      key('rsa', { modulusLength: 2048 }), // RS256 and PS256
      key('ec', { namedCurve: 'P-256' }), // ES256
      key('ed25519'), // EdDSA / Ed25519
    ],
  };
}

// A stable 8-digit number per username, so tests can predict it without configuring it.
function employeeNumber(username) {
  return 10_000_000 + (createHash('sha256').update(username).digest().readUInt32BE(0) % 90_000_000);
}

const BUILTIN_USERS = {
  alice: { roles: ['editor'], channels: ['news', 'sports'], employee_number: 80249751 },
  bob: { roles: ['viewer'], channels: ['news'] },
};

function claimsFor(username, users) {
  const claims = {
    sub: username,
    email: `${username}@example.com`,
    email_verified: true,
    name: username.charAt(0).toUpperCase() + username.slice(1),
    preferred_username: username,
    roles: [],
    channels: [],
    employee_number: employeeNumber(username),
    ...BUILTIN_USERS[username],
    ...users[username],
  };
  claims.sub = username; // sub is the login name, whatever the overrides say
  for (const [name, value] of Object.entries(claims)) {
    if (value === null) delete claims[name];
  }
  return claims;
}

function claimsConfig(users) {
  const scoped = new Set(['sub', 'email', 'email_verified', 'name', 'preferred_username']);
  const custom = new Set(['roles', 'channels', 'employee_number']);
  for (const overrides of [...Object.values(BUILTIN_USERS), ...Object.values(users)]) {
    for (const name of Object.keys(overrides)) if (!scoped.has(name)) custom.add(name);
  }
  return {
    openid: ['sub', ...custom],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
  };
}

function clientMetadata(client) {
  return {
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: 'RS256',
    ...client,
  };
}

function registrationFeature(token) {
  if (!token) return { enabled: false };
  return {
    enabled: true,
    initialAccessToken: String(token), // only the test harness knows it
    issueRegistrationAccessToken: false,
    idFactory: (ctx) => ctx.oidc.body.client_id ?? randomBytes(12).toString('base64url'),
    secretFactory: async (ctx) => ctx.oidc.body.client_secret ?? randomBytes(32).toString('base64url'),
  };
}

function providerConfiguration(config) {
  const users = config.users ?? {};
  const rotate = config.rotate_refresh_tokens ?? true;
  const ttl = (key, fallback) => Number(config[key] ?? fallback);
  return {
    clients: (config.clients ?? []).map(clientMetadata),
    jwks: generateJwks(),
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    claims: claimsConfig(users),
    scopes: ['openid', 'offline_access', 'email', 'profile'],
    conformIdTokenClaims: false, // the sidecar reads claims from the ID token, not userinfo
    async findAccount(_ctx, sub) {
      return { accountId: sub, claims: async () => claimsFor(sub, users) };
    },
    features: {
      devInteractions: { enabled: true },
      revocation: { enabled: true },
      introspection: { enabled: true },
      registration: registrationFeature(config.registration_token),
      // OpenID Connect RP-Initiated Logout 1.0 (GET/POST /session/end, a confirmation form)
      // and Back-Channel Logout 1.0 (a logout token POSTed to each client's
      // backchannel_logout_uri, with `sid` when backchannel_logout_session_required).
      rpInitiatedLogout: { enabled: true },
      backchannelLogout: { enabled: true },
    },
    // The library's outgoing requests (back-channel logout tokens) refuse loopback addresses
    // (SSRF protection); every RP of this test OP is on 127.0.0.1, so drop that dispatcher.
    fetch: (url, { dispatcher: _ssrfGuard, ...options }) => globalThis.fetch(url, options),
    pkce: { required: (_ctx, client) => client.clientAuthMethod === 'none' },
    issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    expiresWithSession: async () => false,
    rotateRefreshToken: () => rotate,
    ttl: {
      AccessToken: () => ttl('access_token_ttl', 3600),
      AuthorizationCode: () => 60,
      ClientCredentials: () => 600,
      DeviceCode: () => 600,
      BackchannelAuthenticationRequest: () => 600,
      PreAuthorizedCode: () => 600,
      IdToken: () => ttl('id_token_ttl', 3600),
      RefreshToken: () => ttl('refresh_token_ttl', 14 * DAY),
      Interaction: () => 3600,
      Session: () => ttl('session_ttl', 14 * DAY),
      Grant: () => ttl('refresh_token_ttl', 14 * DAY),
    },
  };
}

function exitWhenOrphaned(server) {
  const stop = () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  if (!process.stdin.isTTY) {
    process.stdin.on('data', () => {});
    process.stdin.on('end', stop);
    process.stdin.on('error', stop);
  }
}

// client_id -> grant_type -> {success, error}: every token endpoint request, counted.
function countGrants(provider) {
  const grants = {};
  const count = (ctx, outcome) => {
    const client = ctx.oidc?.client?.clientId ?? '-';
    const type = ctx.oidc?.params?.grant_type ?? '-';
    grants[client] ??= {};
    grants[client][type] ??= { success: 0, error: 0 };
    grants[client][type][outcome] += 1;
  };
  provider.on('grant.success', (ctx) => count(ctx, 'success'));
  provider.on('grant.error', (ctx) => count(ctx, 'error'));
  return grants;
}

function answerGrants(req, res, grants, token) {
  const url = new URL(req.url, 'http://127.0.0.1');
  const authorized = req.headers.authorization === `Bearer ${token}`;
  res.statusCode = authorized ? 200 : 401;
  res.setHeader('Content-Type', 'application/json');
  res.end(JSON.stringify(authorized ? grants[url.searchParams.get('client_id')] ?? {} : {}));
}

async function main() {
  const { port, config } = readOptions();
  let handler = (_req, res) => {
    res.statusCode = 503;
    res.end();
  };
  const server = createServer((req, res) => handler(req, res));
  exitWhenOrphaned(server);
  // Loopback only: this provider accepts any login and must never be reachable from elsewhere.
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', resolve);
  });
  const actualPort = server.address().port;
  const issuer = `http://127.0.0.1:${actualPort}`;
  const provider = new Provider(issuer, providerConfiguration(config));
  // A refused logout token is otherwise silent: say why on stderr (the harness keeps it).
  provider.on('backchannel.error', (_ctx, error, client) => {
    console.error(`backchannel logout to ${client.clientId} failed: ${error.message}`);
  });
  const grants = countGrants(provider);
  const callback = provider.callback();
  handler = (req, res) => {
    if (config.registration_token && req.url.startsWith('/_test/grants?')) {
      return answerGrants(req, res, grants, String(config.registration_token));
    }
    return callback(req, res);
  };
  process.stdout.write(`${JSON.stringify({ issuer, port: actualPort })}\n`);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
