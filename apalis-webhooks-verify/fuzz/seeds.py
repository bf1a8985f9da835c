"""Writes a seed corpus for the `verify` target into corpus/verify/: genuinely signed inputs of
every scheme (v1 from the published Standard Webhooks vectors' keys, v1a, Stripe, GitHub) at the
target's clock, so the fuzzer starts from messages that verify and mutates from there.

    python3 seeds.py && cargo fuzz run -s none verify corpus/verify -- -max_total_time=600
"""
import base64
import hashlib
import hmac
import json
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

NOW = 1_700_000_000  # the target's clock
SEP = b"\xff"
here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "corpus", "verify")
os.makedirs(out, exist_ok=True)
vectors = json.load(open(os.path.join(here, "..", "tests", "vectors", "standard-webhooks.json")))["vectors"]


def write(name, selector, msg_id, ts, signature, secret, body):
    data = bytes([selector]) + SEP.join([msg_id.encode(), str(ts).encode(), signature.encode(), secret, body.encode()])
    open(os.path.join(out, name), "wb").write(data)


for n, v in enumerate(vectors):
    key = base64.b64decode(v["secret"].removeprefix("whsec_"))
    content = f"{v['id']}.{NOW}.{v['body']}".encode()
    sig = "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    write(f"standard-{n}", 0, v["id"], NOW, sig, v["secret"].encode(), v["body"])
    # selector 0x80 | 0 % 3 == 0 needs a multiple of 3: 0x81 % 3 == 0 (raw key bytes)
    write(f"standard-bytes-{n}", 0x81, v["id"], NOW, sig, key, v["body"])

body = '{"type":"order.created","data":{"order":7}}'
seed = hashlib.sha256(b"fuzz seed").digest()
signature = Ed25519PrivateKey.from_private_bytes(seed).sign(f"msg_v1a.{NOW}.{body}".encode())
# 0x60 % 3 == 0: Standard with a whsk_ key made of the secret field (here a 32-byte seed).
write("v1a", 0x60, "msg_v1a", NOW, "v1a," + base64.b64encode(signature).decode(), seed, body)

secret = b"stripe_shared_secret_0123456789"
mac = hmac.new(secret, f"{NOW}.{body}".encode(), hashlib.sha256).hexdigest()
write("stripe", 1, "", NOW, f"t={NOW},v1={mac}", secret, body)
mac = hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()
write("github", 2, "", NOW, f"sha256={mac}", secret, body)
print(f"{len(os.listdir(out))} seeds in {out}")
