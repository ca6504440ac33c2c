"""What a user does first, on a runtime-only install: serve the bundled models, ask once, stop.

Run with the interpreter of a venv that holds `pip install .` (no extras) and nothing else; it uses
the standard library and that install only, so that a runtime import missing from the dependencies, or
a file the package does not ship (the gRPC .proto), fails here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

READY = re.compile(r"ready on http://([\d.]+):(\d+): (\d+) model\(s\) ready")
GRPC = re.compile(r"KServe v2 gRPC on ([\d.]+):(\d+)")
TIMEOUT_S = 300


def main() -> int:
    appliance = Path(sys.executable).parent / "appliance"
    with tempfile.TemporaryDirectory(prefix="appliance-smoke-") as scratch:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        for variable, name in (("STATE_DIRECTORY", "state"), ("CACHE_DIRECTORY", "cache"),
                               ("RUNTIME_DIRECTORY", "run")):  # fmt: skip
            env[variable] = str(Path(scratch) / name)
        providers = subprocess.run(
            [str(appliance), "providers", "--json"], capture_output=True, text=True, env=env, cwd=scratch
        )
        check(providers.returncode == 0, f"appliance providers failed:\n{providers.stderr}")
        listed = {p["name"] for p in json.loads(providers.stdout)["providers"]}
        check(not listed & {"fake", "broken"}, f"test-only plugins in a user install: {sorted(listed)}")
        server = subprocess.Popen(
            [str(appliance), "serve", "--port", "0", "--grpc-port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=scratch,
        )
        lines: list[str] = []
        ready = threading.Event()
        found: list[re.Match[str]] = []

        def pump() -> None:
            assert server.stdout is not None
            for line in server.stdout:
                lines.append(line)
                if not found and (match := READY.search(line)):
                    found.append(match)
                    ready.set()
            ready.set()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            check(ready.wait(TIMEOUT_S) and bool(found), "serve never reported ready:\n" + "".join(lines))
            host, port, count = found[0].groups()
            check(int(count) == 4, f"expected the 4 bundled models, serving {count}")
            url = f"http://{host}:{port}"
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=30) as answer:
                check(answer.status == 200, f"/v2/health/ready answered {answer.status}")
            request = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 128, 128],
                                   "data": [0.5] * (128 * 128)}]}  # fmt: skip
            post = urllib.request.Request(
                f"{url}/v2/models/surface_defect/infer", data=json.dumps(request).encode(), method="POST"
            )
            with urllib.request.urlopen(post, timeout=60) as answer:
                document = json.load(answer)
            outputs = {o["name"]: o for o in document["outputs"]}
            check(outputs["defect_prob"]["shape"] == [1, 1], f"unexpected answer: {document}")
            print(f"smoke: {url} answered defect_prob {outputs['defect_prob']['data']}")
            grpc_address = next(m.groups() for line in lines if (m := GRPC.search(line)))
            check_grpc(*grpc_address)
            server.send_signal(signal.SIGTERM)
            code = server.wait(60)
            reader.join(30)
            check(code == 0, f"serve exited {code} after SIGTERM:\n" + "".join(lines[-20:]))
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(30)
    print("smoke: a runtime-only install serves the bundled models and stops cleanly")
    return 0


def check_grpc(host: str, port: str) -> None:
    """KServe v2 over gRPC from the same install: its stubs come from the .proto shipped inside."""
    import grpc

    from appliance.server.grpc import messages

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        service = f"/{messages.SERVICE}"
        ready = channel.unary_unary(f"{service}/ServerReady")(
            messages.request_of("ServerReady")().SerializeToString(), timeout=30
        )
        check(messages.response_of("ServerReady").FromString(ready).ready, "gRPC ServerReady is false")
        request = messages.ModelInferRequest(model_name="surface_defect")
        request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 128, 128])
        request.raw_input_contents.append(bytes(4 * 128 * 128))
        answer = channel.unary_unary(f"{service}/ModelInfer")(request.SerializeToString(), timeout=60)
    response = messages.ModelInferResponse.FromString(answer)
    shapes = {o.name: list(o.shape) for o in response.outputs}
    check(shapes.get("defect_prob") == [1, 1], f"unexpected gRPC answer: {response}")
    print(f"smoke: gRPC on {host}:{port} answered {shapes}")


def check(condition: bool, message: str) -> None:
    if not condition:
        print(f"smoke: FAILED: {message}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    raise SystemExit(main())
