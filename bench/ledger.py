"""Receipts and checks, measured: receipts committed per second (SQLite, PostgreSQL), the cost of signing
and verifying an answer, and what canaries cost at the default probability.

    python bench/ledger.py [--runs 5] [--receipts 20000] [--postgres postgresql://postgres@127.0.0.1/test]

1. Receipts/s: `--receipts` signed receipts committed through the gateway's ledger thread
   (platform/writer.py) by 1 and by 256 concurrent waiters (each await returns only once its receipt's
   transaction has committed: group commit shares a commit among those waiting). SQLite is a file in a
   temporary directory (WAL, synchronous=FULL); PostgreSQL a fresh schema in the given database.
2. Signing and verifying, per job, for each bundled model's one-row job and a tiny one: what the node adds
   (two tensor digests, an Ed25519 signature, the splice into the header) and what the gateway adds
   (decode and digest the answer, verify, build and sign the receipt).
3. Canaries: per canary, the gateway's work (draw and perturb golden rows, encode, the trusted ONNX
   Runtime run on one thread, verify, compare); the node's work is one ordinary job. At probability p the
   pool does p more jobs per buyer job, and the gateway p times the canary's work.

Everything runs at the idle priority it is started with (run it under `nice -n 19` on a shared box);
each figure is the median of --runs runs, with the min and max.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.platform import checks, receipts, verify  # noqa: E402
from appliance.platform.golden import Golden, References  # noqa: E402
from appliance.platform.ledger import Ledger  # noqa: E402
from appliance.platform.view import NodeView  # noqa: E402
from appliance.platform.writer import LedgerWriter  # noqa: E402
from appliance.pool import identity, signing  # noqa: E402
from appliance.protocol import codec  # noqa: E402

MODELS = ROOT / "models"


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}  # fmt: skip


def receipt(index: int, key: object) -> receipts.Receipt:
    return receipts.Receipt(
        f"{uuid.uuid4().hex}/0", uuid.uuid4().hex, 0, receipts.BUYER, True, "acme", f"site/n{index % 100}", 1,
        "surface_defect", "a" * 64, 1, "b" * 64, "c" * 64, 0.5, 3.2, 8.1, 50.0, True, "s" * 88,
        receipts.ACCEPTED, "", "gw-bench", int(time.time() * 1000),
    ).signed(key)  # type: ignore[arg-type]  # fmt: skip


async def commit_rate(url: str, count: int, waiters: int, key: object) -> float:
    writer = LedgerWriter(Ledger.open(url))
    batch = [receipt(i, key) for i in range(count)]  # signed beforehand: this times the ledger alone
    queue = iter(batch)

    async def waiter() -> None:
        for item in queue:
            await writer.commit(item)

    started = time.perf_counter()
    await asyncio.gather(*(waiter() for _ in range(waiters)))
    elapsed = time.perf_counter() - started
    writer.close()
    return count / elapsed


def postgres_schema(url: str) -> tuple[str, Callable[[], None]]:
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')

    def drop() -> None:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')

    return f"{url}?options=-csearch_path%3D{schema}", drop


def receipts_per_s(args: argparse.Namespace) -> dict[str, object]:
    key = identity.generate()
    found: dict[str, object] = {}
    for kind in ("sqlite", "postgresql"):
        for waiters in (1, 256):
            count = args.receipts if waiters > 1 else min(args.receipts, 2000)
            rates = []
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory() as scratch:
                    if kind == "sqlite":
                        url, drop = str(Path(scratch) / "ledger.sqlite3"), (lambda: None)
                    else:
                        url, drop = postgres_schema(args.postgres)
                    try:
                        rates.append(asyncio.run(commit_rate(url, count, waiters, key)))
                    finally:
                        drop()
            found[f"{kind}, {waiters} waiting"] = spread(rates, 0)
    return found


def per_call_us(function: Callable[[], object], runs: int, calls: int = 200) -> dict[str, float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        times.append((time.perf_counter() - started) / calls * 1e6)
    return spread(times, 1)


def jobs() -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """One-row jobs: inputs and outputs of each bundled model (run once here), and a tiny one."""
    found = {"tiny (FP32 [1, 4])": ({"x": np.ones((1, 4), np.float32)}, {"y": np.ones((1, 4), np.float32)})}
    for name in ("surface_defect", "surface_defect_224"):
        golden = Golden(MODELS / name / "1" / "samples.npz")
        inputs = {k: v[:1] for k, v in golden.inputs.items()}
        session = ort.InferenceSession(
            str(MODELS / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        found[name] = (inputs, dict(zip(names, session.run(names, inputs), strict=True)))
    return found


def trusted_node(key: object) -> NodeView:
    node = NodeView("site", "n1", needs_key=True, birth={"public_key": signing.public_key_text(key)})  # type: ignore[arg-type]
    node.trusted_key = node.public_key
    return node


def signing_costs(runs: int) -> dict[str, object]:
    key = identity.generate()
    return {
        name: signing_case(name, inputs, outputs, key, runs) for name, (inputs, outputs) in jobs().items()
    }


def signing_case(
    name: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], key: object, runs: int
) -> dict[str, object]:
    node = trusted_node(key)
    encoded_request = codec.encode_request(inputs)
    request = codec.decode_request(encoded_request.body(), encoded_request.header_length)

    def encode_only() -> codec.EncodedResponse:
        return codec.encode_response(model_name=name, model_version="1", request=request, outputs=outputs)

    def sign() -> codec.EncodedResponse:
        encoded = encode_only()
        statement = signing.Statement("job/0", "a" * 64, signing.tensor_digest(request.inputs),
                                      signing.tensor_digest(outputs), 0.1, 3.0, "n1", 1)  # fmt: skip
        proof = {**statement.fields(), "signature": signing.sign(key, statement)}  # type: ignore[arg-type]
        header, *blobs = encoded.parts
        signed = signing.attach(bytes(header), proof)
        return codec.EncodedResponse([signed, *blobs], len(signed) if blobs else None)

    answer = sign()
    payload, length = answer.body(), answer.header_length

    def check() -> None:
        input_sha = signing.tensor_digest(request.inputs)  # the gateway's digest of the buyer's request
        proof = verify.check(node, "job/0", payload, length, input_sha256=input_sha, files=None)
        receipts.Receipt("job/0", "job", 0, "buyer", True, "acme", "site/n1", 1, name, "a" * 64, 1,
                         input_sha, proof.statement.output_sha256, 0.1, 3.0, 5.0, 50.0, True,
                         proof.signature, "accepted", "", "gw", 0).signed(key)  # type: ignore[arg-type]  # fmt: skip

    def decode_only() -> None:
        codec.decode_response(payload, length)

    return {
        "node: encode answer (no signing)": per_call_us(encode_only, runs),
        "node: encode + digests + sign": per_call_us(sign, runs),
        "gateway: decode answer (no verifying)": per_call_us(decode_only, runs),
        "gateway: input digest + decode + digest + verify + signed receipt": per_call_us(check, runs),
    }


def canary_costs(runs: int) -> dict[str, object]:
    references = References(threads=1)
    rng = np.random.default_rng(0)
    return {
        name: canary_case(name, references, rng, runs) for name in ("surface_defect", "surface_defect_224")
    }


def canary_case(name: str, references: References, rng: np.random.Generator, runs: int) -> dict[str, object]:
    golden = Golden(MODELS / name / "1" / "samples.npz")
    path = MODELS / name / "1" / "model.onnx"
    references.run(path, golden.draw(1, rng, 0.01))  # the session is made once, on first use

    def canary() -> None:
        inputs = golden.draw(1, rng, 0.01)
        codec.encode_request(inputs).body()
        expected = references.run(path, inputs)
        checks.compare(expected, expected, 0.02, 0.0)

    return {"gateway per canary (draw, encode, trusted run, compare), µs": per_call_us(canary, runs, 20)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--receipts", type=int, default=20000)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--only", choices=["receipts", "signing", "canary"])
    args = parser.parse_args()
    report: dict[str, object] = {
        "bench": "ledger",
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": args.runs,
    }
    if args.only in (None, "receipts"):
        report["receipts_per_s"] = receipts_per_s(args)
    if args.only in (None, "signing"):
        report["signing_us_per_job"] = signing_costs(args.runs)
    if args.only in (None, "canary"):
        report["canary_us"] = canary_costs(args.runs)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
