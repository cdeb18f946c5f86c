"""Prints one sdk-probe report (a JSON line on stdin) for people: what the
AWS SDK saw from inside the pod. Used by `make demo`."""

import json
import sys

r = json.loads(sys.stdin.read())
token = r["token"] or {}
print(f"    caller:         {r['caller_arn']}")
print(f"    STS token:      aud={token.get('aud')} sub={token.get('sub')} ttl={token.get('exp', 0) - token.get('iat', 0)}s")
kube = r.get("kube_token")
if kube:
    print(
        f"    API token:      aud={kube['aud']} ttl={kube['exp'] - kube['iat']}s "
        "(ephemera's, for the pod's own ServiceAccount: the identity has kubernetes.rules)"
    )
else:
    print("    API token:      none (/var/run/secrets/kubernetes.io/serviceaccount does not exist)")
for g in r["gets"]:
    print(f"    read {g['uri']}: {'ok' if g['ok'] else g.get('err')}")
for d in r["denies"]:
    print(f"    read {d['uri']}: {'AccessDenied' if d['denied'] else 'NOT DENIED: ' + str(d.get('err'))}")
if not r["ok"]:
    print(f"    FAILED: {r['failures']}")
    sys.exit(1)
