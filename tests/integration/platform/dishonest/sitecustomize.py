"""Turns a real `appliance serve` into a dishonest node, for the tests that must catch one.

Python imports this at start-up when its directory is on PYTHONPATH (a test puts it there for that node
only). LIE_SHA256: the node reports that digest for every model file it serves, whatever the file is.
TAMPER_SIGNATURE: the node signs its answers with a key that is not the one its birth announces.
"""

import os

if os.environ.get("LIE_SHA256"):
    from appliance.engine import model

    model.file_digest = lambda path: os.environ["LIE_SHA256"]

if os.environ.get("TAMPER_SIGNATURE"):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from appliance.pool import signing

    _other = Ed25519PrivateKey.generate()
    _sign = signing.sign
    signing.sign = lambda key, statement: _sign(_other, statement)
