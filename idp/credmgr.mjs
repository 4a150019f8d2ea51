// A stand-in FABRIC Credential Manager for tokenhub's tests, following the
// CM's documented API (fabric-testbed/CredentialManager, openapi.json) as
// FABlib (`fabrictestbed`) calls it:
//
//   POST /credmgr/tokens/refresh?project_id=…&project_name=…&scope=all
//        {"refresh_token": …}: a refresh at the identity provider with the
//        CM's client (client_secret_basic), then a FABRIC JWT (RS256, this
//        process's key, `projects` claims) minted from the new ID token;
//        answers {"data":[Token],"size":1,"status":200,"type":"token"}.
//        A refusal at the IdP is a 500 whose details say "Refresh token is
//        invalid or has expired", as the CM's are.
//   GET  /credmgr/certs          the JWT's key set
//   GET  /credmgr/version        {"data":[{"reference":…,"version":…}],…}
//   POST /credmgr/tokens/validate {"type":"identity","token":jwt}: its claims
//   POST /credmgr/tokens/revokes  {"type":"refresh","token":rt}: revoked at the IdP
//   POST /credmgr/tokens/create  (needs the login's cookie: 401 here)
//
// Settings (environment):
//   CM_PORT            port on 127.0.0.1
//   CM_IDP             the identity provider's issuer URL
//   CM_CLIENT_ID       the client the CM refreshes with (shared with tokenhub)
//   CM_CLIENT_SECRET   its secret
//   CM_TOKEN_TTL       the FABRIC JWT's lifetime in seconds (default 3600)
//   CM_PARENT_PID      exit when this process is gone
//
// Test control: GET /_test/stats (refreshes asked, answered, refused,
// dropped; calls by path), POST /_test/drop?count=N (the next N refreshes
// are made at the IdP and their answers dropped: the connection is closed
// unanswered), POST /_test/fail?count=N&status=S (the next N refreshes
// answer S without reaching the IdP), POST /_test/hold?seconds=T&count=N (the
// next N refreshes are made at the IdP, then answered T seconds later),
// POST /_test/mintfail?count=N (the next N refreshes are made at the IdP, then
// fail making the FABRIC token: a 500 whose text carries the new refresh
// token, as the CM's does).
import crypto from 'node:crypto';
import http from 'node:http';

const port = Number(process.env.CM_PORT || 7000);
const idp = (process.env.CM_IDP || 'http://127.0.0.1:9000').replace(/\/$/, '');
const clientId = process.env.CM_CLIENT_ID || 'tokenhub';
const clientSecret = process.env.CM_CLIENT_SECRET || 'tokenhub-secret';
const ttl = Number(process.env.CM_TOKEN_TTL || 3600);
const base = `http://127.0.0.1:${port}`;

const { privateKey, publicKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const kid = crypto.randomBytes(8).toString('hex');
const jwk = { ...publicKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' };

const stats = { asked: 0, answered: 0, refused: 0, dropped: 0, failed: 0, paths: {} };
const faults = { drop: 0, fail: 0, failStatus: 503, hold: 0, holdMs: 0, mintfail: 0 };

const b64 = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');
function sign(claims) {
  const head = b64({ alg: 'RS256', typ: 'JWT', kid });
  const body = b64(claims);
  const sig = crypto.sign('sha256', Buffer.from(`${head}.${body}`), privateKey).toString('base64url');
  return `${head}.${body}.${sig}`;
}
function verify(jwt) {
  const [head, body, sig] = String(jwt).split('.');
  if (!sig) return null;
  const ok = crypto.verify('sha256', Buffer.from(`${head}.${body}`), publicKey, Buffer.from(sig, 'base64url'));
  return ok ? JSON.parse(Buffer.from(body, 'base64url').toString()) : null;
}
const claimsOf = (jwt) => JSON.parse(Buffer.from(String(jwt).split('.')[1] || '', 'base64url').toString() || '{}');
// FABRIC's timestamp format: 2026-06-04 13:09:25 +0000.
const stamp = (s) => `${new Date(s * 1000).toISOString().slice(0, 19).replace('T', ' ')} +0000`;

function reply(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}
const cmError = (res, status, message, details) => reply(res, status, {
  errors: [{ message, details }], size: 1, status, type: 'error',
});

let discovered;
async function endpoints() {
  if (!discovered) discovered = await (await fetch(`${idp}/.well-known/openid-configuration`)).json();
  return discovered;
}
const basic = `Basic ${Buffer.from(`${encodeURIComponent(clientId)}:${encodeURIComponent(clientSecret)}`).toString('base64')}`;

async function refresh(req, res, url, body) {
  stats.asked += 1;
  if (faults.fail > 0) {
    faults.fail -= 1;
    stats.failed += 1;
    return cmError(res, faults.failStatus, 'Service Unavailable', 'test fault');
  }
  const refreshToken = body?.refresh_token;
  if (!refreshToken) return cmError(res, 400, 'Bad Request', 'refresh_token is required');
  const scope = url.searchParams.get('scope') || 'all';
  const projectId = url.searchParams.get('project_id');
  const projectName = url.searchParams.get('project_name');
  const { token_endpoint: tokenEndpoint } = await endpoints();
  const answer = await fetch(tokenEndpoint, {
    method: 'POST',
    headers: { authorization: basic, 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' },
    body: new URLSearchParams({ grant_type: 'refresh_token', refresh_token: refreshToken }),
  });
  const tokens = await answer.json().catch(() => ({}));
  if (!answer.ok) {
    stats.refused += 1;
    return cmError(res, 500, 'Internal Server Error',
      `(${tokens.error}) ${tokens.error_description || ''}: Refresh token is invalid or has expired, please visit ${base}/ to generate a new token!`);
  }
  if (faults.mintfail > 0) {
    faults.mintfail -= 1;
    stats.mintfailed = (stats.mintfailed || 0) + 1;
    return cmError(res, 500, 'Internal Server Error',
      `error: the project registry did not answer, refresh_token: ${tokens.refresh_token}`);
  }
  const idClaims = claimsOf(tokens.id_token);
  const now = Math.floor(Date.now() / 1000);
  const project = { uuid: projectId || 'all', name: projectName || 'all', tags: [], memberships: { is_member: true, is_token_holder: true } };
  const jwt = sign({
    iss: `${base}/`, aud: ['cm.fabric-testbed.net'], sub: idClaims.sub, email: idClaims.email, name: idClaims.name,
    uuid: crypto.createHash('sha256').update(String(idClaims.sub)).digest('hex').slice(0, 32),
    projects: [project], scope, iat: now, exp: now + ttl, jti: crypto.randomUUID(),
  });
  if (faults.drop > 0) {
    // The refresh is done at the IdP; its answer never reaches the caller.
    faults.drop -= 1;
    stats.dropped += 1;
    req.socket.destroy();
    return undefined;
  }
  if (faults.hold > 0) {
    faults.hold -= 1;
    stats.held = (stats.held || 0) + 1;
    await new Promise((resolve) => { setTimeout(resolve, faults.holdMs); });
  }
  stats.answered += 1;
  return reply(res, 200, {
    data: [{
      id_token: jwt, refresh_token: tokens.refresh_token, created_at: stamp(now), expires_at: stamp(now + ttl),
      state: 'Valid', token_hash: crypto.createHash('sha256').update(jwt).digest('hex'),
      comment: 'Created via API', created_from: req.socket.remoteAddress,
    }],
    size: 1, status: 200, type: 'token',
  });
}

async function handle(req, res, url, body) {
  const path = url.pathname;
  if (path.startsWith('/_test/')) {
    if (path === '/_test/stats') return reply(res, 200, stats);
    if (path === '/_test/drop') { faults.drop = Number(url.searchParams.get('count') || 1); return reply(res, 200, faults); }
    if (path === '/_test/mintfail') {
      faults.mintfail = Number(url.searchParams.get('count') || 1);
      return reply(res, 200, faults);
    }
    if (path === '/_test/hold') {
      faults.hold = Number(url.searchParams.get('count') || 1);
      faults.holdMs = 1000 * Number(url.searchParams.get('seconds') || 5);
      return reply(res, 200, faults);
    }
    if (path === '/_test/fail') {
      faults.fail = Number(url.searchParams.get('count') || 1);
      faults.failStatus = Number(url.searchParams.get('status') || 503);
      return reply(res, 200, faults);
    }
    return reply(res, 404, { error: 'not_found' });
  }
  stats.paths[path] = (stats.paths[path] || 0) + 1;
  if (path === '/credmgr/tokens/refresh' && req.method === 'POST') return refresh(req, res, url, body);
  if (path === '/credmgr/certs') return reply(res, 200, { keys: [jwk] });
  if (path === '/credmgr/version') {
    return reply(res, 200, { data: [{ reference: 'stand-in', version: '1.8.0' }], size: 1, status: 200, type: 'version' });
  }
  if (path === '/credmgr/tokens/validate' && req.method === 'POST') {
    const claims = verify(body?.token);
    if (!claims || claims.exp < Date.now() / 1000) return cmError(res, 401, 'Unauthorized', 'token is not valid');
    return reply(res, 200, { token: claims, state: 'Valid', size: 1, status: 200, type: 'token' });
  }
  if (path === '/credmgr/tokens/revokes' && req.method === 'POST') {
    const token = body?.type === 'refresh' ? body.token : null;
    if (!token) return cmError(res, 400, 'Bad Request', 'a refresh token is required');
    const { revocation_endpoint: endpoint } = await endpoints();
    await fetch(endpoint, {
      method: 'POST',
      headers: { authorization: basic, 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ token, token_type_hint: 'refresh_token' }),
    });
    return reply(res, 200, { data: [{ details: 'Token has been successfully revoked' }], size: 1, status: 200, type: 'no_content' });
  }
  if (path === '/credmgr/tokens/create') return cmError(res, 401, 'Unauthorized', 'No CI Logon Id Token in the request');
  return cmError(res, 404, 'Not Found', `no such call: ${req.method} ${path}`);
}

http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const url = new URL(req.url, base);
    let body = null;
    try { body = chunks.length ? JSON.parse(Buffer.concat(chunks).toString()) : null; } catch { body = null; }
    handle(req, res, url, body).catch((e) => cmError(res, 500, 'Internal Server Error', String(e)));
  });
}).listen(port, '127.0.0.1', () => console.log(`stand-in Credential Manager on ${base}, IdP ${idp}`));

if (process.env.CM_PARENT_PID) {
  const parent = Number(process.env.CM_PARENT_PID);
  setInterval(() => { try { process.kill(parent, 0); } catch { process.exit(0); } }, 1000).unref();
}
