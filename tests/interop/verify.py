"""Verify captured deliveries with the official libraries of other languages.

Reads JSON from stdin: {"cases": [{"scheme", "secret", "body", "headers"}]}.
Prints "ok" per case, or raises (non-zero exit) on the first rejection.
"""
import json
import sys

import standardwebhooks
import stripe

for case in json.load(sys.stdin)["cases"]:
    body, headers, secret = case["body"], case["headers"], case["secret"]
    if case["scheme"] == "standard":
        standardwebhooks.Webhook(secret).verify(body, headers)
    elif case["scheme"] == "stripe":
        stripe.WebhookSignature.verify_header(body, headers["stripe-signature"], secret, 300)
    else:
        raise SystemExit(f"unknown scheme {case['scheme']}")
    print("ok")
