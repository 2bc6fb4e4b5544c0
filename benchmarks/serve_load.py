"""Load test of `vlmexport serve`: C concurrent clients x R requests each, over loopback.

Checks that no request is lost (every one answered 200) and that every answer equals what
`vlmexport run` prints for the same image and question (greedy), and reports latency
p50/p95/max and throughput. A sequential pass (one client) runs first on the same server
as the baseline.

    python benchmarks/serve_load.py --workdir /tmp/serve-load                     # 16 x 20, demo bundle
    python benchmarks/serve_load.py --bundle B --backend llamacpp --clients 8 --requests 10
    python benchmarks/serve_load.py --max-concurrency 2 --json load.json
    python benchmarks/serve_load.py --bundle B --sweep 1,4,8 --max-tokens 32 --requests 6   # batched vs sequential

Not a test: latencies depend on the machine and on what else runs on it (the load average
is printed before and after). Exit status 1 if a request was lost or an answer differed.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import Server, ask, demo_bundle, items, load_average, percentile  # noqa: E402


def client_loop(server: Server, model: str, its, k: int, requests: int, max_tokens: int, stream_every: int,
                results: list, lock: threading.Lock) -> None:
    client = server.client()
    for j in range(requests):
        item = its[(k + j) % len(its)]
        t0 = time.perf_counter()
        try:
            answer = ask(client, model, item, max_tokens, stream=bool(stream_every) and j % stream_every == 0)
            error = None
        except Exception as exc:  # noqa: BLE001 - counted as lost, reported
            answer, error = None, f"{exc.__class__.__name__}: {exc}"
        with lock:
            results.append({"client": k, "i": j, "latency_s": time.perf_counter() - t0, "answer": answer,
                            "expected": item.expected, "error": error})


def run(server: Server, model: str, its, clients: int, requests: int, max_tokens: int, stream_every: int) -> dict:
    results: list = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for k in range(clients):
            pool.submit(client_loop, server, model, its, k, requests, max_tokens, stream_every, results, lock)
    wall = time.perf_counter() - t0
    lat = [r["latency_s"] for r in results if r["error"] is None]
    lost = [r for r in results if r["error"] is not None]
    differ = [r for r in results if r["error"] is None and r["answer"] != r["expected"]]
    return {"clients": clients, "requests_per_client": requests, "sent": clients * requests,
            "answered": len(results) - len(lost), "lost": len(lost), "different_answers": len(differ),
            "examples_lost": [r["error"] for r in lost[:3]],
            "examples_different": [(r["answer"], r["expected"]) for r in differ[:3]],
            "p50_ms": percentile(lat, 50) * 1e3, "p95_ms": percentile(lat, 95) * 1e3,
            "max_ms": max(lat, default=float("nan")) * 1e3, "wall_s": wall, "requests_per_s": len(lat) / wall}


def sweep(args) -> int:
    """Requests/s and generated tokens/s at several client counts: one model copy serving one request at a
    time (sequential) against the same copy batching decode steps (--batch = the largest count)."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or demo_bundle(args.workdir)
    its = items(bundle, args.workdir, args.items, args.max_tokens, args.backend, args.precision)
    counts = [int(c) for c in args.sweep.split(",")]
    model = bundle.resolve().name
    report = {"bundle": str(bundle), "max_tokens": args.max_tokens, "load_average_before": load_average(), "runs": []}
    for mode, batch in (("sequential", 0), ("batched", max(counts))):
        extra = ["--backend", "onnxruntime", "--batch", str(batch), "--max-queue", str(4 * max(counts)),
                 "--request-timeout", "600"] + (["--threads", str(args.threads)] if args.threads else [])
        server = Server(bundle, *extra, log=args.workdir / f"server-{mode}.log")
        try:
            for clients in counts:
                results: list = []
                lock = threading.Lock()

                def one(k: int) -> None:
                    client = server.client()
                    for j in range(args.requests):
                        item = its[(k + j) % len(its)]
                        r = client.chat.completions.create(model=model, max_tokens=args.max_tokens, temperature=0,
                                                           messages=[{"role": "user", "content": [
                                                               {"type": "image_url", "image_url": {"url": item.url}},
                                                               {"type": "text", "text": item.question}]}])
                        with lock:
                            results.append((r.choices[0].message.content.strip() == item.expected,
                                            r.usage.completion_tokens))
                t0 = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    list(pool.map(one, range(clients)))
                wall = time.perf_counter() - t0
                run = {"mode": mode, "clients": clients, "requests": len(results),
                       "identical": sum(ok for ok, _ in results), "tokens": sum(n for _, n in results),
                       "requests_per_s": len(results) / wall, "tokens_per_s": sum(n for _, n in results) / wall}
                report["runs"].append(run)
                print(f"{mode:>10} ({'--batch ' + str(batch) if batch else 'one at a time'}), {clients} client(s): "
                      f"{run['requests']} requests, identical to `vlmexport run` {run['identical']}, "
                      f"{run['requests_per_s']:.1f} req/s, {run['tokens_per_s']:.0f} generated tok/s", flush=True)
        finally:
            server.close()
    report["load_average_after"] = load_average()
    print(f"load average before {report['load_average_before']}, after {report['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all(r["identical"] == r["requests"] for r in report["runs"]) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to serve (default: the demo model, built into --workdir)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vlmexport-serve-load"))
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--items", type=int, default=8, help="distinct image+question pairs")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-concurrency", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stream-every", type=int, default=2, help="every n-th request streams (0: none)")
    ap.add_argument("--batch", type=int, default=0, help="serve with --batch N (onnxruntime batched decode)")
    ap.add_argument("--sweep", default=None, help="e.g. 1,4,8: throughput at these client counts, on a server "
                    "without and one with --batch (the largest count), instead of the load test")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.sweep:
        return sweep(args)

    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or demo_bundle(args.workdir)
    its = items(bundle, args.workdir, args.items, args.max_tokens, args.backend, args.precision)
    extra = ["--backend", args.backend, "--max-concurrency", str(args.max_concurrency), "--batch", str(args.batch),
             "--max-queue", str(args.clients * 2), "--request-timeout", "600"]
    extra += ["--precision", args.precision] if args.precision else []
    extra += ["--threads", str(args.threads)] if args.threads else []
    server = Server(bundle, *extra, log=args.workdir / "server.log")
    model = bundle.resolve().name
    report = {"bundle": str(bundle), "backend": args.backend, "max_concurrency": args.max_concurrency,
              "load_average_before": load_average()}
    try:
        print(f"load average before: {report['load_average_before']}")
        report["sequential"] = run(server, model, its, 1, max(len(its), args.requests), args.max_tokens,
                                   args.stream_every)
        report["concurrent"] = run(server, model, its, args.clients, args.requests, args.max_tokens,
                                   args.stream_every)
        report["server_rss_mb"] = server.rss_mb()
    finally:
        server.close()
    report["load_average_after"] = load_average()
    for name in ("sequential", "concurrent"):
        r = report[name]
        print(f"{name:>10}: {r['clients']} client(s) x {r['requests_per_client']}: answered {r['answered']}/"
              f"{r['sent']}, lost {r['lost']}, answers different from `vlmexport run` {r['different_answers']}; "
              f"latency p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, max {r['max_ms']:.0f} ms; "
              f"{r['requests_per_s']:.1f} req/s")
    print(f"load average after: {report['load_average_after']}; server RSS {report['server_rss_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    bad = any(report[n]["lost"] or report[n]["different_answers"] for n in ("sequential", "concurrent"))
    for n in ("sequential", "concurrent"):
        for ex in report[n]["examples_lost"] + report[n]["examples_different"]:
            print(f"  {n}: {ex}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
