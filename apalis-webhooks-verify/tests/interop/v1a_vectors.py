"""Writes tests/vectors/v1a.json: Standard Webhooks `v1a` (ed25519) vectors made with Python's
`cryptography` (OpenSSL), an implementation that is not ours. Run once; the output is committed.

    python3 tests/interop/v1a_vectors.py > tests/vectors/v1a.json
"""
import base64
import hashlib
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption

b64 = lambda raw: base64.b64encode(raw).decode()

cases = []
bodies = ['{"test": 2432232314}', '{"type":"order.created","data":{"id":7}}', "", "é ünïcödé ✓"]
for n, body in enumerate(bodies):
    # Deterministic seeds, so the file can be regenerated identically.
    seed = hashlib.sha256(f"apalis-webhooks v1a vector {n}".encode()).digest()
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    msg_id, timestamp = f"msg_p5jXN8AQM9LWM0D4loKWxJek{n}", 1614265330 + n
    signature = key.sign(f"{msg_id}.{timestamp}.{body}".encode())
    cases.append({
        # Svix's format: the seed, then the public key.
        "signing_key": "whsk_" + b64(seed + public),
        "seed_key": "whsk_" + b64(seed),
        "public_key": "whpk_" + b64(public),
        "id": msg_id,
        "timestamp": timestamp,
        "body": body,
        "signature": "v1a," + b64(signature),
    })
print(json.dumps({"source": "Python cryptography " + __import__("cryptography").__version__, "vectors": cases}, indent=2, ensure_ascii=False))
