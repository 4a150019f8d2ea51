// The identity provider for tokenhub's tests and demo: npm `oidc-provider`
// (a certified OpenID provider) with PKCE required, refresh-token rotation on,
// a login form where any user name logs in, and state kept in a directory so
// the provider can be stopped and started again without losing grants.
//
// Settings (environment):
//   IDP_PORT               port on 127.0.0.1 (default 9000)
//   IDP_STATE_DIR          where keys and grants are kept (default ./.idp-state)
//   IDP_CLIENT_ID          the relying party's client id (default tokenhub)
//   IDP_CLIENT_SECRET      its secret (default tokenhub-secret)
//   IDP_REDIRECT_URIS      comma-separated redirect URIs
//   IDP_ACCESS_TOKEN_TTL   access-token lifetime in seconds (default 3600)
//   IDP_REFRESH_TOKEN_TTL  refresh-token lifetime in seconds (default 14 days);
//                          with rotation on, each refresh issues a new one, so
//                          this acts as an idle timeout: unused that long, it dies
//   IDP_SEND_REFRESH_EXPIRES_IN=1  token responses carrying a refresh token
//                          also carry `refresh_expires_in` (as Keycloak does)
//   IDP_TEST_CONTROL=1     enable /_test/* (counters, killing a user's grants,
//                          making the key set answer 503 or hang)
//   IDP_JWKS_FAIL_SECONDS  with IDP_TEST_CONTROL=1: for this many seconds after
//                          start the key set answers 503 with Retry-After (an
//                          outage that begins with a key rollover, IDP_ROLL_KEY)
//   IDP_JWKS_HANG=1        ... and, instead of answering 503, holds each request
//                          unanswered until that time is over
//   (POST /_test/token-hold?seconds=N&count=K: the next K token requests wait
//   N seconds, and are dropped unprocessed if their client is gone by then)
//   IDP_STRICT_OFFLINE=1   oidc-provider's spec-strict default: a refresh token
//                          only for offline_access, which needs prompt=consent
//   IDP_REFUSE_OFFLINE_WITHOUT_CONSENT=1  with IDP_STRICT_OFFLINE, answer an
//                          authorization request for offline_access without
//                          prompt=consent with error=invalid_request (as strict
//                          providers do) instead of dropping the scope
//   IDP_ROLL_KEY=1         at start, put a new signing key in front of the old
//                          ones (which stay in the key set): a key rollover
//
// Besides IDP_CLIENT_ID (client_secret_basic), two more clients are
// registered with the same redirect URIs: `<id>-post` (client_secret_post,
// secret IDP_POST_CLIENT_SECRET) and `<id>-symbols` (client_secret_basic,
// secret IDP_SYMBOLS_CLIENT_SECRET, full of characters Basic must encode).
//   IDP_PARENT_PID         exit when this process is gone (tests that start us)
//   IDP_RESOURCE_SERVER    a second resource server (RFC 8707 resource
//                          indicators, default https://storage.example):
//                          access tokens for it are JWTs (RS256, this
//                          provider's keys) with its audience and its scopes
//                          (storage.read storage.modify storage.create),
//                          had with `resource` on a refresh grant (the login
//                          must have asked for the resource) or by an RFC
//                          8693 token exchange of an access token (`audience`
//                          or `resource`), a grant type registered here.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import Provider, { errors } from 'oidc-provider';

const port = Number(process.env.IDP_PORT || 9000);
const issuer = `http://127.0.0.1:${port}`;
const stateDir = path.resolve(process.env.IDP_STATE_DIR || '.idp-state');
const clientId = process.env.IDP_CLIENT_ID || 'tokenhub';
const clientSecret = process.env.IDP_CLIENT_SECRET || 'tokenhub-secret';
const redirectUris = (process.env.IDP_REDIRECT_URIS || 'http://127.0.0.1:8000/callback')
  .split(',').map((s) => s.trim()).filter(Boolean);
const accessTtl = Number(process.env.IDP_ACCESS_TOKEN_TTL || 3600);
const refreshTtl = Number(process.env.IDP_REFRESH_TOKEN_TTL || 14 * 24 * 3600);
const sendRefreshExpiresIn = process.env.IDP_SEND_REFRESH_EXPIRES_IN === '1';
const testControl = process.env.IDP_TEST_CONTROL === '1';
const strictOffline = process.env.IDP_STRICT_OFFLINE === '1';
const refuseOfflineWithoutConsent = process.env.IDP_REFUSE_OFFLINE_WITHOUT_CONSENT === '1';
const postClientSecret = process.env.IDP_POST_CLIENT_SECRET || 'tokenhub-post-secret';
const symbolsClientSecret = process.env.IDP_SYMBOLS_CLIENT_SECRET || 'sec+ret~with/sym=bols:%20&x';

fs.mkdirSync(stateDir, { recursive: true });

// Signing keys survive restarts so tokens issued before a restart still verify.
// IDP_ROLL_KEY=1 puts a new key in front: it signs from now on, and the old
// keys stay published so tokens they signed still verify.
function newKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomUUID(), use: 'sig', alg: 'RS256' };
}
function loadKeys() {
  const file = path.join(stateDir, 'jwks.json');
  const jwks = fs.existsSync(file) ? JSON.parse(fs.readFileSync(file, 'utf8')) : { keys: [] };
  if (!jwks.keys.length || process.env.IDP_ROLL_KEY === '1') {
    jwks.keys.unshift(newKey());
    fs.writeFileSync(file, JSON.stringify(jwks), { mode: 0o600 });
  }
  return jwks;
}

// A small file-backed adapter: the whole store is one JSON file, rewritten on
// each change. Enough for tests and a demo, and it survives a restart.
const storeFile = path.join(stateDir, 'store.json');
const store = fs.existsSync(storeFile) ? JSON.parse(fs.readFileSync(storeFile, 'utf8')) : {};
function persist() {
  const tmp = `${storeFile}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(store));
  fs.renameSync(tmp, storeFile);
}
function now() { return Math.floor(Date.now() / 1000); }

class FileAdapter {
  constructor(name) { this.name = name; }
  key(id) { return `${this.name}:${id}`; }
  async upsert(id, payload, expiresIn) {
    store[this.key(id)] = { payload, exp: expiresIn ? now() + expiresIn : null };
    persist();
  }
  async find(id) {
    const entry = store[this.key(id)];
    if (!entry) return undefined;
    if (entry.exp && entry.exp < now()) { delete store[this.key(id)]; persist(); return undefined; }
    return entry.payload;
  }
  async findByUserCode(userCode) {
    return Object.values(store).map((e) => e.payload).find((p) => p.userCode === userCode);
  }
  async findByUid(uid) {
    const hit = Object.entries(store).find(([k, e]) => k.startsWith(`${this.name}:`) && e.payload.uid === uid);
    return hit ? this.find(hit[0].slice(this.name.length + 1)) : undefined;
  }
  async consume(id) {
    const entry = store[this.key(id)];
    if (entry) { entry.payload.consumed = now(); persist(); }
  }
  async destroy(id) { delete store[this.key(id)]; persist(); }
  async revokeByGrantId(grantId) {
    for (const [k, e] of Object.entries(store)) if (e.payload.grantId === grantId) delete store[k];
    persist();
  }
}

function groupsFor(user) {
  const groups = ['users'];
  if (user.startsWith('admin')) groups.push('admins');
  if (user.startsWith('operator')) groups.push('tokenhub-operators');
  return groups;
}

const resourceServer = process.env.IDP_RESOURCE_SERVER || 'https://storage.example';
const resourceScopes = ['storage.read', 'storage.modify', 'storage.create'];
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';
function resourceServerInfo(resource) {
  if (resource !== resourceServer) throw new errors.InvalidTarget();
  return {
    scope: resourceScopes.join(' '),
    audience: resourceServer,
    accessTokenTTL: accessTtl,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  };
}

const configuration = {
  adapter: FileAdapter,
  jwks: loadKeys(),
  clients: [
    [clientId, clientSecret, 'client_secret_basic'],
    [`${clientId}-post`, postClientSecret, 'client_secret_post'],
    [`${clientId}-symbols`, symbolsClientSecret, 'client_secret_basic'],
  ].map(([id, secret, method]) => ({
    client_id: id,
    client_secret: secret,
    redirect_uris: redirectUris,
    grant_types: ['authorization_code', 'refresh_token', TOKEN_EXCHANGE],
    response_types: ['code'],
    token_endpoint_auth_method: method,
  })),
  pkce: { required: () => true },
  rotateRefreshToken: () => true,
  // Lenient by default (a refresh token for every code, as many providers
  // do); strict: oidc-provider's own default (only with offline_access).
  ...(strictOffline ? {} : { issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token') }),
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  ttl: {
    AccessToken: accessTtl,
    AuthorizationCode: 60,
    IdToken: accessTtl,
    // Every refresh token, a rotated one too, lives this long from its issue.
    RefreshToken: () => refreshTtl,
    Grant: 14 * 24 * 3600,
    Session: 14 * 24 * 3600,
    Interaction: 3600,
  },
  cookies: { keys: ['tokenhub-test-idp-cookie-key'] },
  features: {
    devInteractions: { enabled: false },
    revocation: { enabled: true },
    userinfo: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // Without `resource`, tokens stay what they were: opaque, for userinfo.
      defaultResource: () => undefined,
      useGrantedResource: () => false,
      getResourceServerInfo: (_ctx, resource) => resourceServerInfo(resource),
    },
  },
  // Every user consents to what the relying party asks: no consent screen.
  loadExistingGrant: async (ctx) => {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    let grant = grantId ? await ctx.oidc.provider.Grant.find(grantId) : undefined;
    if (!grant) {
      grant = new ctx.oidc.provider.Grant({ accountId: ctx.oidc.session.accountId, clientId: ctx.oidc.client.clientId });
    }
    grant.addOIDCScope(ctx.oidc.requestParamScopes ? [...ctx.oidc.requestParamScopes].join(' ') : 'openid');
    // A resource asked for is granted the resource scopes asked for.
    for (const resource of [ctx.oidc.params.resource].flat().filter(Boolean)) {
      const asked = [...(ctx.oidc.requestParamScopes || [])].filter((s) => resourceScopes.includes(s));
      if (asked.length) grant.addResourceScope(resource, asked.join(' '));
    }
    await grant.save();
    return grant;
  },
  // `account~Name` is the account `account~Name` (its own subject) whose
  // user-chosen preferred_username is `Name` (percent-decoded), as IdPs that
  // let users edit that claim allow: the tests name other people with it.
  findAccount: async (_ctx, id) => {
    const [account, chosen] = id.includes('~') ? [id.slice(0, id.indexOf('~')), decodeURIComponent(id.slice(id.indexOf('~') + 1))] : [id, id];
    return {
      accountId: id,
      claims: async () => ({
        sub: id,
        preferred_username: chosen,
        name: chosen,
        email: `${account}@example.org`,
        email_verified: true,
        groups: groupsFor(account),
      }),
    };
  },
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  renderError: async (ctx, out) => {
    ctx.type = 'html';
    ctx.body = `<!doctype html><title>IdP error</title><h1>${out.error}</h1><p>${out.error_description || ''}</p>`;
  },
};

const provider = new Provider(issuer, configuration);

// RFC 8693 token exchange: an access token this provider issued (to the
// same client, still valid) for one for the resource server, with scopes
// the login's grant holds for it. No refresh token comes with it (as at
// Cognito): a client asks again with a fresh access token.
provider.registerGrantType(TOKEN_EXCHANGE, async (ctx) => {
  const { params, client } = ctx.oidc;
  if (!params.subject_token) throw new errors.InvalidRequest('missing required parameter subject_token');
  if (params.subject_token_type !== ACCESS_TOKEN_TYPE) throw new errors.InvalidRequest('unsupported subject_token_type');
  const subject = await provider.AccessToken.find(params.subject_token);
  if (!subject || subject.isExpired || subject.clientId !== client.clientId) {
    throw new errors.InvalidGrant('subject_token is not a valid access token of this client');
  }
  const target = params.audience || params.resource;
  const info = resourceServerInfo(target);
  const grant = await provider.Grant.find(subject.grantId);
  if (!grant) throw new errors.InvalidGrant('the grant of the subject_token is gone');
  const asked = params.scope ? params.scope.split(' ').filter(Boolean) : resourceScopes;
  const granted = grant.getResourceScopeFiltered(target, asked);
  const missing = asked.filter((s) => !granted.split(' ').includes(s));
  if (missing.length) throw new errors.InvalidScope('requested scope is not granted', missing.join(' '));
  const at = new provider.AccessToken({ accountId: subject.accountId, client, grantId: subject.grantId, gty: 'token_exchange', scope: granted });
  at.resourceServer = new provider.ResourceServer(target, info);
  const value = await at.save();
  counters.token_exchange += 1;
  byAccount[subject.accountId] ??= { authorization_code: 0, refresh_token: 0 };
  byAccount[subject.accountId].token_exchange = (byAccount[subject.accountId].token_exchange ?? 0) + 1;
  ctx.body = { access_token: value, issued_token_type: ACCESS_TOKEN_TYPE, token_type: 'Bearer', expires_in: at.expiration, scope: granted };
}, ['subject_token', 'subject_token_type', 'audience', 'resource', 'scope', 'requested_token_type']);

// Grants answered, in all and per account (tests running side by side each
// count their own user's refreshes).
const counters = { authorization_code: 0, refresh_token: 0, refresh_token_error: 0, token_exchange: 0 };
const byAccount = {};
provider.on('grant.success', (ctx) => {
  const type = ctx.oidc.params.grant_type;
  if (type in counters) counters[type] += 1;
  const account = ctx.oidc.entities?.Account?.accountId;
  if (account) {
    byAccount[account] ??= { authorization_code: 0, refresh_token: 0 };
    if (type in byAccount[account]) byAccount[account][type] += 1;
  }
});
// Grants revoked through the revocation endpoint (RFC 7009), per account.
provider.on('grant.revoked', (ctx) => {
  const token = ctx.oidc?.entities?.RefreshToken;
  if (ctx.oidc?.route !== 'revocation' || !token) return;
  byAccount[token.accountId] ??= { authorization_code: 0, refresh_token: 0 };
  byAccount[token.accountId].revoked = (byAccount[token.accountId].revoked ?? 0) + 1;
});
provider.on('grant.error', (ctx) => {
  if (ctx.oidc?.params?.grant_type === 'refresh_token') counters.refresh_token_error += 1;
});

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 16 * 1024) throw new Error('form too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}

// Every authorization request is counted (/_test/stats: `authorization`,
// and `authorization_refused` for those refused below).
provider.use(async (ctx, next) => {
  if (ctx.path !== '/auth' || ctx.method !== 'GET') return next();
  counters.authorization = (counters.authorization || 0) + 1;
  const scopes = String(ctx.query.scope || '').split(' ');
  const prompts = String(ctx.query.prompt || '').split(' ');
  const registered = redirectUris.includes(ctx.query.redirect_uri);
  if (refuseOfflineWithoutConsent && registered && scopes.includes('offline_access') && !prompts.includes('consent')) {
    counters.authorization_refused = (counters.authorization_refused || 0) + 1;
    const back = new URL(ctx.query.redirect_uri);
    back.searchParams.set('error', 'invalid_request');
    back.searchParams.set('error_description', 'offline_access scope requires consent in prompt');
    if (ctx.query.state) back.searchParams.set('state', ctx.query.state);
    back.searchParams.set('iss', issuer);
    ctx.redirect(back.href);
    return undefined;
  }
  return next();
});

// The login form: any user name logs in, the password is not checked.
provider.use(async (ctx, next) => {
  const m = ctx.path.match(/^\/interaction\/([^/]+)(\/login)?$/);
  if (!m) return next();
  ctx.set('cache-control', 'no-store');
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (ctx.method === 'GET' && !m[2]) {
    if (details.prompt.name === 'consent' && details.params.prompt?.split(' ').includes('consent')) {
      // Consent was asked for explicitly (prompt=consent): the user grants
      // what is requested, offline_access included.
      const grant = details.grantId
        ? await provider.Grant.find(details.grantId)
        : new provider.Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
      grant.addOIDCScope(details.params.scope);
      const grantId = await grant.save();
      await provider.interactionFinished(ctx.req, ctx.res, { consent: { grantId } }, { mergeWithLastSubmission: true });
      return undefined;
    }
    if (details.prompt.name !== 'login') {
      // Only consent is missing: loadExistingGrant grants it, so just finish.
      await provider.interactionFinished(ctx.req, ctx.res, {
        login: { accountId: details.session.accountId },
      }, { mergeWithLastSubmission: true });
      return undefined;
    }
    ctx.type = 'html';
    ctx.body = `<!doctype html><html><head><title>Test IdP sign-in</title></head><body>
<h1>Test identity provider</h1><p>Any user name signs in; the password is not checked.</p>
<form method="post" action="/interaction/${escapeHtml(details.uid)}/login">
<label>User name <input name="login" id="login" autofocus required></label>
<label>Password <input name="password" id="password" type="password"></label>
<button type="submit" id="submit">Sign in</button></form></body></html>`;
    return undefined;
  }
  if (ctx.method === 'POST' && m[2]) {
    const form = await readForm(ctx.req);
    const login = (form.get('login') || '').trim();
    if (!/^[a-z0-9][a-z0-9._-]{0,63}(~[A-Za-z0-9%._+-]{1,200})?$/.test(login)) {
      ctx.status = 400;
      ctx.body = 'user name must be lower-case letters, digits, ".", "_" or "-", optionally followed by ~ and a chosen preferred_username (percent-encoded)';
      return undefined;
    }
    await provider.interactionFinished(ctx.req, ctx.res, { login: { accountId: login } }, { mergeWithLastSubmission: false });
    return undefined;
  }
  return next();
});

// `refresh_expires_in` beside every refresh token issued, when asked for:
// the token endpoint's answer is an object until koa writes it out.
if (sendRefreshExpiresIn) {
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.path === '/token' && ctx.status === 200 && ctx.body && typeof ctx.body === 'object' && ctx.body.refresh_token) {
      ctx.body.refresh_expires_in = refreshTtl;
    }
  });
}

// Test control, off unless IDP_TEST_CONTROL=1.
let jwksFailures = 0;
// The next `count` token requests wait `ms` first (/_test/token-hold).
const tokenHolds = { count: 0, ms: 0 };
// Until when (ms since the epoch) the key set is down, and how: 503 or hanging.
let jwksDownUntil = Date.now() + 1000 * Number(process.env.IDP_JWKS_FAIL_SECONDS || 0);
let jwksHang = process.env.IDP_JWKS_HANG === '1';
provider.use(async (ctx, next) => {
  if (testControl && ctx.path === '/jwks' && (jwksFailures > 0 || Date.now() < jwksDownUntil)) {
    counters.jwks_failed = (counters.jwks_failed || 0) + 1;
    if (jwksFailures > 0) {
      jwksFailures -= 1;
    } else if (jwksHang) {
      await new Promise((resolve) => { setTimeout(resolve, jwksDownUntil - Date.now()); });
      return next();
    }
    ctx.status = 503;
    ctx.set('retry-after', '5');
    ctx.body = 'key set unavailable (test fault)';
    return undefined;
  }
  if (testControl && ctx.path === '/jwks') counters.jwks_served = (counters.jwks_served || 0) + 1;
  if (testControl && ctx.path === '/token' && tokenHolds.count > 0) {
    // A slow token endpoint: the request waits; if its client is gone by
    // then (killed), it is dropped unprocessed, as if it never arrived.
    tokenHolds.count -= 1;
    counters.token_held = (counters.token_held || 0) + 1;
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, tokenHolds.ms);
      ctx.req.socket.once('close', () => { clearTimeout(timer); resolve(); });
    });
    if (ctx.req.socket.destroyed) {
      counters.token_dropped = (counters.token_dropped || 0) + 1;
      return undefined;
    }
  }
  if (!testControl || !ctx.path.startsWith('/_test/')) return next();
  ctx.type = 'json';
  if (ctx.path === '/_test/stats') {
    const account = ctx.query.account;
    ctx.body = account ? (byAccount[account] ?? { authorization_code: 0, refresh_token: 0 }) : counters;
  } else if (ctx.path === '/_test/kill' && ctx.method === 'POST') {
    // Kill every grant (and so every refresh token) of one account.
    const account = ctx.query.account;
    let killed = 0;
    for (const [k, e] of Object.entries(store)) {
      if (k.startsWith('Grant:') && e.payload.accountId === account) {
        await new FileAdapter('Grant').revokeByGrantId(k.slice('Grant:'.length));
        delete store[k];
        killed += 1;
      }
    }
    persist();
    ctx.body = { killed };
  } else if (ctx.path === '/_test/jwks-fail' && ctx.method === 'POST') {
    // The next `count` requests for the key set answer 503; or, with
    // `seconds`, every request for that long (held unanswered with `hang=1`).
    if (ctx.query.seconds) {
      jwksDownUntil = Date.now() + 1000 * Number(ctx.query.seconds);
      jwksHang = ctx.query.hang === '1';
    } else {
      jwksFailures = Number(ctx.query.count || 1);
    }
    ctx.body = { jwks_failures: jwksFailures, down_until: jwksDownUntil };
  } else if (ctx.path === '/_test/token-hold' && ctx.method === 'POST') {
    tokenHolds.count = Number(ctx.query.count || 1);
    tokenHolds.ms = 1000 * Number(ctx.query.seconds || 30);
    ctx.body = { ...tokenHolds };
  } else {
    ctx.status = 404;
    ctx.body = { error: 'not_found' };
  }
  return undefined;
});

// A test runner that dies without cleaning up must not leave us behind.
const parentPid = Number(process.env.IDP_PARENT_PID || 0);
if (parentPid) {
  setInterval(() => {
    try { process.kill(parentPid, 0); } catch { process.exit(0); }
  }, 1000).unref();
}

provider.listen(port, '127.0.0.1', () => {
  console.log(`test IdP listening at ${issuer}`);
});
