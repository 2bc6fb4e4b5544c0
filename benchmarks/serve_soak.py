"""Soak test of `vlmexport serve`: N requests in one server process, its RSS sampled every 100.

The mix exercises every path a long-running server sees: plain and streamed answers (checked
against `vlmexport run`), broken images (400), prompts over the context (400) and streams the
client abandons after one chunk (the slot must be freed). Memory growth is measured from the
sample after the first 100 requests (warm-up: allocator pools, onnxruntime arenas) to the last.

    python benchmarks/serve_soak.py --workdir /tmp/serve-soak                 # 1000 requests, demo bundle
    python benchmarks/serve_soak.py --bundle B --backend llamacpp --requests 400

Not a test. Exit status 1 if RSS grew more than --max-growth (default 5%) after the first 100,
a request was lost or an answer differed.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import Server, ask, demo_bundle, items, load_average  # noqa: E402


def one(client, model: str, its, i: int, max_tokens: int) -> str:
    """Request ``i`` of the mix; returns its outcome: ok, different, error-as-expected, abandoned, lost:..."""
    import openai

    item = its[i % len(its)]
    kind = i % 10
    try:
        if kind in (0, 1, 2, 3, 4, 5):
            answer = ask(client, model, item, max_tokens, stream=kind % 2 == 1)
            return "ok" if answer == item.expected else "different"
        if kind == 6:  # a broken image
            bad = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(64)).decode()
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": bad}}, {"type": "text", "text": "?"}]}])
            return "lost: a broken image was answered"
        if kind == 7:  # a prompt over the context
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "more " * 2000}])
            return "lost: an over-long prompt was answered"
        # 8, 9: a stream the client abandons after the first chunk
        stream = client.chat.completions.create(model=model, stream=True, max_tokens=max_tokens, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": item.url}},
                                         {"type": "text", "text": item.question}]}])
        next(iter(stream))
        stream.close()
        return "abandoned"
    except openai.BadRequestError:
        return "error-as-expected" if kind in (6, 7) else "lost: 400"
    except Exception as exc:  # noqa: BLE001
        return f"lost: {exc.__class__.__name__}: {exc}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vlmexport-serve-soak"))
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100, help="RSS sample period (requests)")
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-growth", type=float, default=0.05)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or demo_bundle(args.workdir)
    its = items(bundle, args.workdir, args.items, args.max_tokens, args.backend, args.precision)
    extra = ["--backend", args.backend] + (["--precision", args.precision] if args.precision else [])
    server = Server(bundle, *extra, log=args.workdir / "server.log")
    model = bundle.resolve().name
    client = server.client()
    outcomes: dict[str, int] = {}
    samples = [(0, server.rss_mb())]
    print(f"load average before: {load_average()}; RSS at start {samples[0][1]:.1f} MB")
    t0 = time.perf_counter()
    try:
        for i in range(1, args.requests + 1):
            out = one(client, model, its, i - 1, args.max_tokens)
            key = out if not out.startswith("lost") else "lost"
            outcomes[key] = outcomes.get(key, 0) + 1
            if out.startswith("lost") and outcomes["lost"] <= 3:
                print(f"  request {i}: {out}")
            if i % args.every == 0:
                time.sleep(0.2)  # let abandoned generations finish before sampling
                samples.append((i, server.rss_mb()))
                print(f"  {i:5d} requests: RSS {samples[-1][1]:.1f} MB ({time.perf_counter() - t0:.0f} s)")
        alive = server.proc.poll() is None
    finally:
        server.close()
    base = next((rss for n, rss in samples if n >= args.every), samples[0][1])
    growth = (samples[-1][1] - base) / base
    report = {"bundle": str(bundle), "backend": args.backend, "requests": args.requests, "outcomes": outcomes,
              "rss_samples_mb": samples, "growth_after_first_sample": growth, "server_alive": alive,
              "wall_s": time.perf_counter() - t0, "load_average_after": load_average()}
    print(f"outcomes: {outcomes}")
    print(f"RSS after {samples[1][0] if len(samples) > 1 else 0}: {base:.1f} MB, at the end: {samples[-1][1]:.1f} MB "
          f"-> growth {growth:+.2%} (limit {args.max_growth:.0%}); load average after: {report['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    ok = growth <= args.max_growth and not outcomes.get("lost") and not outcomes.get("different") and alive
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
