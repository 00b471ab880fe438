"""`liandan serve` under load: requests/s and p50/p95 latency at 1, 4 and 16 concurrent official openai
clients, for each engine, against a real server process; then a burst at a server with a bounded queue.

    .venv/bin/python benchmarks/serve_load.py [--adapter-path /work/shared-demo/adapters] [--engines torch llama.cpp]

Every client asks the adapter's training questions (the demo's jokes: exact answers known), greedy;
each answer is checked against the one the same server gives when asked alone. The burst sends
--burst requests at once to a server with --max-queue 32: the excess must get 429, every accepted
request its correct answer, and the server's RSS must stay flat (before, after, and the peak seen).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


class ServerProcess:
    def __init__(self, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="serve-load-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "liandan", "serve", "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.time() + 900  # the first llama.cpp start converts the GGUFs
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"server failed:\n{Path(self.log.name).read_text()[-3000:]}")
            try:
                httpx.get(self.url + "/health", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.5)
        sys.exit("server did not start")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        os.unlink(self.log.name)


def questions() -> list[str]:
    """The demo's questions (liandan/examples/jokes), the ones the demo adapter was trained on."""
    from liandan.demo import example_dir

    rows = (example_dir() / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in rows if line.strip()]


def ask(client, model: str, question: str, max_tokens: int) -> tuple[str, float]:
    start = time.perf_counter()
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content, time.perf_counter() - start


def load_level(server, model, qs, expected, clients: int, per_client: int, max_tokens: int) -> dict:
    import openai

    latencies, wrong, lock = [], [], threading.Lock()

    def worker(k):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
        for j in range(per_client):
            q = qs[(k * per_client + j) % len(qs)]
            text, seconds = ask(client, model, q, max_tokens)
            with lock:
                latencies.append(seconds)
                if text != expected[q]:
                    wrong.append((q, text))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    # "inclusive": with fewer than 19 samples the default method extrapolates past the slowest request measured
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"clients": clients, "requests": len(latencies), "rps": len(latencies) / wall, "p50": statistics.median(latencies),
            "p95": q[18], "wrong": len(wrong)}


def burst(server, model, qs, expected, n: int, max_tokens: int) -> dict:
    import openai

    statuses, wrong, peak = [], [], [server.rss_mb()]
    before = peak[0]
    ready = threading.Barrier(n)  # every client made before any request goes: the burst arrives at once

    def one(i):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=900)
        q = qs[i % len(qs)]
        ready.wait()
        try:
            text, _ = ask(client, model, q, max_tokens)
            statuses.append(200)
            if text != expected[q]:
                wrong.append(q)
        except openai.RateLimitError as exc:
            statuses.append(429 if exc.response.headers.get("retry-after") else -429)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak.append(server.rss_mb())
        time.sleep(0.2)
    return {"sent": n, "ok": statuses.count(200), "429": statuses.count(429), "429 without Retry-After": statuses.count(-429),
            "wrong": len(wrong), "rss_before": before, "rss_after": server.rss_mb(), "rss_peak": max(peak)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter-path", default="/work/shared-demo/adapters" if Path("/work/shared-demo/adapters").is_dir()
                        else None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--engines", nargs="+", default=["torch", "llama.cpp"])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--per-client", type=int, default=2, help="Requests each client sends at each level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=4, help="llama.cpp slots")
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--burst-engine", default="llama.cpp")
    args = parser.parse_args()

    source = (["--adapter-path", args.adapter_path] if args.adapter_path else []) + (["--model", args.model] if args.model else [])
    model = "bench"
    qs = questions()
    rows, bursts = [], []
    for engine in args.engines:
        extra = ["--engine", engine, "--parallel", str(args.parallel), "--model-name", model]
        server = ServerProcess(*source, *extra)
        try:
            import openai

            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
            expected = {q: ask(client, model, q, args.max_tokens)[0] for q in qs}
            for level in args.levels:
                rows.append({"engine": engine, **load_level(server, model, qs, expected, level, args.per_client,
                                                            args.max_tokens)})
                print(rows[-1], flush=True)
        finally:
            server.stop()
        if engine == args.burst_engine and args.burst:
            server = ServerProcess(*source, *extra, "--max-queue", "32")
            try:
                expected = {q: ask(openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0), model, q,
                                   args.max_tokens)[0] for q in qs}
                bursts.append({"engine": engine, **burst(server, model, qs, expected, args.burst, args.max_tokens)})
            finally:
                server.stop()
    report(args, rows, bursts)


def report(args, rows, bursts) -> None:
    print(f"\n{args.adapter_path or args.model or 'smollm2-135m'}: chat completions, greedy, max_tokens {args.max_tokens}, "
          f"{args.per_client} requests per client, llama.cpp --parallel {args.parallel}, {os.cpu_count()} CPU threads\n")
    print(f"{'engine':<11}{'clients':>8}{'requests':>9}{'req/s':>8}{'p50 s':>8}{'p95 s':>8}{'wrong':>7}{'vs torch':>10}")
    print("-" * 69)
    torch_rps = {r["clients"]: r["rps"] for r in rows if r["engine"] == "torch"}
    for r in rows:
        ratio = r["rps"] / torch_rps[r["clients"]] if r["clients"] in torch_rps else float("nan")
        print(f"{r['engine']:<11}{r['clients']:>8}{r['requests']:>9}{r['rps']:>8.2f}{r['p50']:>8.2f}{r['p95']:>8.2f}"
              f"{r['wrong']:>7}{ratio:>9.1f}x")
    for b in bursts:
        print(f"\nburst of {b['sent']} at once, {b['engine']}, --max-queue 32: {b['ok']} answered ({b['wrong']} wrong), "
              f"{b['429']} got 429 with Retry-After ({b['429 without Retry-After']} without); RSS {b['rss_before']:.0f} MB "
              f"before, {b['rss_peak']:.0f} MB peak, {b['rss_after']:.0f} MB after")


if __name__ == "__main__":
    main()
