// A real OpenID provider (panva's certified oidc-provider) for the test suite, on loopback.
//
//   node tests/oidc/provider.mjs PORT
//   env: OIDC_REDIRECT_URI (the app's callback), OIDC_CLIENT_SECRET
//
// Two confidential clients share the redirect URI: `web` (the app under test) and `other` (a second relying
// party, for tokens meant for someone else). PKCE is required. Nobody types a password: the dev interaction
// pages are off and /interaction/:uid signs in the account named by `?account=` (default `tester`), or
// answers access_denied with `?deny=1`. Consent is granted by loadExistingGrant.
import Provider from 'oidc-provider';

const port = Number(process.argv[2] ?? process.env.OIDC_PORT);
const redirectUri = process.env.OIDC_REDIRECT_URI;
const clientSecret = process.env.OIDC_CLIENT_SECRET;
if (!Number.isInteger(port) || port <= 0 || !redirectUri || !clientSecret) {
  console.error('usage: OIDC_REDIRECT_URI=… OIDC_CLIENT_SECRET=… node provider.mjs PORT');
  process.exit(2);
}

const SCOPE = 'openid email profile';
const issuer = `http://127.0.0.1:${port}`;
const client = (clientId) => ({
  client_id: clientId,
  client_secret: clientSecret,
  redirect_uris: [redirectUri],
  grant_types: ['authorization_code'],
  response_types: ['code'],
});

const provider = new Provider(issuer, {
  clients: [client('web'), client('other')],
  pkce: { required: () => true },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
  },
  conformIdTokenClaims: false, // put email and profile claims in the ID token, where the app reads them
  cookies: { keys: ['hivewire-test-oidc-cookie-key'] },
  features: { devInteractions: { enabled: false } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: `${id}@example.org`, email_verified: true, name: `Test ${id}`, preferred_username: id };
      },
    };
  },
  async loadExistingGrant(ctx) {
    const { client: rp, session } = ctx.oidc;
    const grantId = ctx.oidc.result?.consent?.grantId ?? session.grantIdFor(rp.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    if (!session.accountId) return undefined;
    const grant = new ctx.oidc.provider.Grant({ clientId: rp.clientId, accountId: session.accountId });
    grant.addOIDCScope(SCOPE);
    await grant.save();
    return grant;
  },
});

provider.use(async (ctx, next) => {
  const match = /^\/interaction\/([\w-]+)$/.exec(ctx.path);
  if (ctx.method !== 'GET' || !match) return next();
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  const result = ctx.query.deny
    ? { error: 'access_denied', error_description: 'the test user declined' }
    : { login: { accountId: String(ctx.query.account || 'tester') } };
  ctx.redirect(await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: false }));
  console.log(`interaction ${details.uid}: ${ctx.query.deny ? 'denied' : 'login'}`);
});

provider.listen(port, '127.0.0.1', () => console.log(`ready ${issuer}`));
