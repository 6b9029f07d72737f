#!/usr/bin/env python3
"""Writes every captured Go message of the wire-vector file as a fuzz seed (make fuzz)."""
import json
import os
import sys

vectors, out = sys.argv[1], sys.argv[2]
doc = json.load(open(vectors))
messages = doc["messages"] + doc["later_phases_same_session"] + doc["ha_peer_link"]["messages"]
payloads = [bytes.fromhex(m["hex"]) for m in messages if m.get("opcode") == "binary" and m.get("hex")]
for target in ("decode", "session"):
    os.makedirs(os.path.join(out, target), exist_ok=True)
for i, p in enumerate(payloads):
    open(os.path.join(out, "decode", f"go-{i:03}"), "wb").write(p)
    # The session target reads [op, len, bytes...]; op 0 feeds a message.
    if len(p) < 256:
        open(os.path.join(out, "session", f"go-{i:03}"), "wb").write(bytes([0, 0, len(p)]) + p)
print(f"{len(payloads)} seeds in {out}")
