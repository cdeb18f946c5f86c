"""Start MiniStack (IAM/STS emulator) for ephemera's e2e tests.

Run as `python launch.py` with AUTH=true, BIND_HOST and GATEWAY_PORT in the
environment (e2e/scripts/cluster.sh does this).

Why a wrapper and not the `ministack` command: Kubernetes ServiceAccount
tokens carry `aud` as a JSON array (`["sts.amazonaws.com"]`). Real AWS STS
matches a trust policy's `StringEquals <issuer>:aud` against such a token (IRSA
trust policies rely on it), but MiniStack 1.5.33 compares the whole list and
denies. Ephemera's trust policies must stay AWS-correct, so the test bed closes
that fidelity gap here: a one-element `aud` list is turned into its string
before the trust evaluation. A wrong audience is still denied.

It also closes a second gap: MiniStack 1.5.33 lets a token assume a role
whatever the IAM OIDC provider of its issuer, even when the account has none
(measured: AssumeRoleWithWebIdentity succeeds after DeleteOpenIDConnectProvider).
AWS answers `InvalidIdentityToken`, "No OpenIDConnect provider found in your
account for https://<issuer>", the commonest setup mistake ephemera must name;
so does this launcher, checking the provider before the trust policy.

A third: MiniStack 1.5.33 evaluates an IAM request naming a role (TagRole,
UntagRole, DeleteRolePermissionsBoundary...) against
`arn:aws:iam::<account>:role/<name>`, without the role's path; AWS uses the
role's ARN, path included (`role/ephemera/<name>`), so a policy naming roles
under a path (ephemera's revocation sets deny roles under the root undoing
them) matched nothing. The launcher uses the stored role's ARN.

It also listens on the real node's address (EPHEMERA_MINISTACK_EXTRA_BIND,
host:port, comma-separated) besides BIND_HOST: pods reach MiniStack there,
and MiniStack has one BIND_HOST only. Never 0.0.0.0: nothing but loopback and
the node's bridge may see it.
"""

import os
import sys

import hypercorn.config
from ministack import app
from ministack.core import iam_actions
from ministack.services import sts

_EXTRA_BINDS = [b for b in os.environ.get("EPHEMERA_MINISTACK_EXTRA_BIND", "").split(",") if b]
_bind = hypercorn.config.Config.bind


def _set_bind_with_extras(config, value):
    binds = [value] if isinstance(value, str) else list(value)
    _bind.fset(config, binds + [b for b in _EXTRA_BINDS if b not in binds])


hypercorn.config.Config.bind = property(_bind.fget, _set_bind_with_extras)

_original_principal = sts._web_identity_principal


def _principal_with_scalar_aud(token, provider_id, role_arn):
    principal, keys = _original_principal(token, provider_id, role_arn)
    for key, value in list(keys.items()):
        if key.endswith(":aud") and isinstance(value, list) and len(value) == 1:
            keys[key] = value[0]
    return principal, keys


sts._web_identity_principal = _principal_with_scalar_aud

_original_trust_denied = sts._web_identity_trust_denied


def _trust_denied_without_provider(role_arn, params, use_json):
    from ministack.services import iam as iam_svc

    provider, _ = sts._web_identity_principal(
        sts._p(params, "WebIdentityToken"), sts._p(params, "ProviderId"), role_arn)
    if ":oidc-provider/" in provider:
        account = role_arn.split(":")[4]
        if not iam_svc._oidc_providers.contains_scoped(account, None, provider):
            host = provider.split(":oidc-provider/", 1)[1]
            message = f"No OpenIDConnect provider found in your account for https://{host}"
            if use_json:
                return sts.error_response_json("InvalidIdentityToken", message, 400)
            return sts._error(400, "InvalidIdentityToken", message, ns="sts")
    return _original_trust_denied(role_arn, params, use_json)


sts._web_identity_trust_denied = _trust_denied_without_provider

_original_resource_arn = iam_actions.extract_resource_arn


def _resource_arn_with_role_path(service, method, path, headers, body, query_params, region, account_id):
    arn = _original_resource_arn(service, method, path, headers, body, query_params, region, account_id)
    if service == "iam" and ":role/" in arn:
        from ministack.services import iam as iam_svc

        role = iam_svc._roles.get(arn.split(":role/", 1)[1])
        if role and role.get("Arn"):
            return role["Arn"]
    return arn


iam_actions.extract_resource_arn = _resource_arn_with_role_path

if __name__ == "__main__":
    sys.argv = [sys.argv[0]]
    app.main()
