"""Before/after table of hostile inputs (issue 20): run each case against a source tree and
classify what the user sees.

    git archive <old-commit> | tar -x -C /tmp/before      # the tree before the hardening
    python benchmarks/hardening_table.py BUNDLE --tree /tmp/before --tree . --markdown table.md

BUNDLE is a bundle with onnx (+ gguf and torch for those cases), e.g.
``vlmexport build --out demo --format onnx,gguf --precision fp32,f16``. Every CLI case runs in
a fork of one warm process per tree (so the imports are paid once), under an address-space
limit (``--vmem-kb``, default 6,000,000: the machine is shared), with its own peak RSS from
``wait4``. Outcomes:

    one-line (2)   one line on stderr, exit status 2: what the project promises
    traceback      a Python traceback
    out of memory  MemoryError / bad_alloc / killed under the address-space limit
    accepted       exit 0: for a bad input this means it was silently accepted
    faithful / WRONG  for images: the centre pixel against the expected one
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
CORPUS = HERE / "tests" / "hardening" / "corpus"


def edited_bundle(src: Path, dst: Path, edit: str | None, flip: str | None = None) -> Path:
    """A copy of ``src`` (hard links; manifest and any flipped file copied) with ``edit`` (python on ``m``)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=os.link)
    mp = dst / "manifest.json"
    m = json.loads(mp.read_text())
    mp.unlink()
    scope = {"m": m, "json": json}
    if edit:
        exec(edit, scope)  # noqa: S102 - the table's own case definitions; may set `raw` (the file's text)
    mp.write_text(scope.get("raw") or json.dumps(m))
    if flip:
        p = dst / flip
        raw = bytearray(p.read_bytes())
        p.unlink()
        raw[len(raw) // 2] ^= 1
        p.write_bytes(bytes(raw))
    return dst


def cli_cases(bundle: Path, work: Path, img: Path) -> list[tuple[str, str, list[str]]]:
    run = ["run", None, "--image", str(img), "--prompt", "What colour?", "--max-new-tokens", "4"]

    def tampered(name, edit, backend="onnxruntime", flip=None):
        b = edited_bundle(bundle, work / name, edit, flip)
        args = list(run)
        args[1] = str(b)
        return args + ["--backend", backend]

    ro = work / "file-not-dir"
    ro.write_text("x")
    empty = work / "empty-dir"
    empty.mkdir(exist_ok=True)
    half = work / "half-bundle"
    (half / "onnx").mkdir(parents=True, exist_ok=True)
    ok = list(run)
    ok[1] = str(bundle)
    deep = "raw = json.dumps(m)[:-1] + ', \"benchmarks\": ' + '[' * 50000 + ']' * 50000 + '}'"
    return [
        ("manifest", "max_length 10^9 (onnxruntime)", tampered("ctx", "m['model']['max_length'] = 10**9")),
        ("manifest", "max_length 10^5 (llamacpp)", tampered("ctxl", "m['model']['max_length'] = 10**5",
                                                              "llamacpp")),
        ("manifest", "image_tokens 10^8", tampered("imgtok", "m['model']['image_tokens'] = 10**8")),
        ("manifest", "image_tokens 200 (encoder gives 64)", tampered("imgtok2", "m['model']['image_tokens'] = 200")),
        ("manifest", "num_layers 1000", tampered("layers", "m['model']['num_layers'] = 1000")),
        ("manifest", "max_length as a string", tampered("ctxs", "m['model']['max_length'] = '320'")),
        ("manifest", "model section missing", tampered("nomodel", "del m['model']")),
        ("manifest", "model section a list", tampered("modellist", "m['model'] = []")),
        ("manifest", "validation nested 50,000 deep", tampered("deep", deep)),
        ("manifest", "chat template '{0}'", tampered("tmpl", "m['chat_template']['user'] = 'Q: {0}'")),
        ("manifest", "tokenizer file key missing", tampered("tokfile", "del m['tokenizer']['file']")),
        ("manifest", "artifact size_bytes 'abc'", tampered("size", "m['artifacts'][1]['size_bytes'] = 'abc'")),
        ("inspect", "inspect: vocab_size edited", ["inspect", str(edited_bundle(
            bundle, work / "vocab", "m['model']['vocab_size'] = 4096"))]),
        ("inspect", "inspect: one byte flipped in a weight file", ["inspect", str(edited_bundle(
            bundle, work / "flip", None, "onnx/connector.fp32.onnx.data"))]),
        ("errors", "run --max-new-tokens -1", ok + ["--max-new-tokens", "-1"]),
        ("errors", "run --temperature nan", ok + ["--temperature", "nan"]),
        ("errors", "run --top-p 0", ok + ["--top-p", "0"]),
        ("errors", "run --prompt <invalid UTF-8>", ok[:5] + [b"caf\xe9".decode("utf-8", "surrogateescape")]),
        ("errors", "run --backend torch --precision int3", ok + ["--backend", "torch", "--precision", "int3"]),
        ("errors", "eval --n-per-category -3", ["eval", "--n-per-category", "-3"]),
        ("errors", "eval --split bogus --n-per-category 2", ["eval", "--split", "bogus", "--n-per-category", "2"]),
        ("errors", "eval --json <dir below a file>", ["eval", "--n-per-category", "2", "--json",
                                                      str(ro / "x" / "e.json")]),
        ("errors", "build --out <dir below a file>", ["build", "--out", str(ro / "b"), "--no-validate"]),
        ("errors", "run on a folder without a manifest", ["run", str(empty), "--image", str(img), "--prompt", "x"]),
        ("errors", "run on a bundle lacking its manifest", ["run", str(half), "--image", str(img), "--prompt", "x"]),
    ]


API = r"""
import json, sys, numpy as np
from vlmexport.runtimes.loader import load
from vlmexport.core.errors import VlmexportError
pipe = load(sys.argv[1], backend="onnxruntime")
img = sys.argv[2]
cases = {
 "generate(prompt=None)": lambda: pipe.generate(None),
 "generate(images='a.png') (a string)": lambda: pipe.generate("<image>Colour?", images=img),
 "generate(images=ndarray) (bare array)": lambda: pipe.generate("<image>Colour?", images=np.zeros((8, 8, 3), np.uint8)),
 "generate(max_tokens=4) (unknown option)": lambda: pipe.generate("Colour?", max_tokens=4),
 "generate(temperature=nan)": lambda: pipe.generate("Colour?", temperature=float("nan")),
 "generate(stop_strings='###')": lambda: pipe.generate("Colour?", stop_strings="###", max_new_tokens=2),
 "chat('hello') (not a list)": lambda: pipe.chat("hello"),
 "load(threads=-1)": lambda: load(sys.argv[1], threads=-1),
}
out = {}
for name, fn in cases.items():
    try:
        fn()
        out[name] = "accepted"
    except VlmexportError as e:
        out[name] = "one-line error" if "\n" not in str(e) else "multi-line error"
    except Exception as e:
        out[name] = f"{type(e).__name__}"
print(json.dumps(out))
"""

IMAGES = r"""
import json, sys, numpy as np
from vlmexport.core.preprocess import open_image
exp = json.loads(open(sys.argv[1]).read())
out = {}
for rel in sys.argv[2:]:
    e = exp[rel]
    try:
        img = open_image(sys.argv[1].rsplit("/", 1)[0] + "/" + rel)
        if "pixel" in e:
            x, y, rgb = e["pixel"]
            got = np.asarray(img)[y, x].astype(int).tolist()
            ok = max(abs(a - b) for a, b in zip(got, rgb)) <= 6 and list(img.size) == e["size"]
            want = list(e["size"])
            out[rel] = ("faithful" if ok else f"WRONG size {list(img.size)} (want {want})" if list(img.size) != want
                        else f"WRONG {got} (want {rgb})")
        else:
            out[rel] = "accepted (should be refused)"
    except Exception as ex:
        kind = "refused, one line" if "VlmexportError" in [c.__name__ for c in type(ex).__mro__] else type(ex).__name__
        out[rel] = kind if "error" in e else f"refused ({kind})"
print(json.dumps(out))
"""
IMAGE_CASES = ["images/mode_I16.png", "images/rgb48.png", "images/mode_I.tiff", "images/mode_F.tiff",
               "images/mode_RGBA_transparent.png", "images/mode_LA_transparent.png", "images/mode_P_tRNS.png",
               "images/mode_PA.tiff", "images/rgba64_transparent.png", "images/mode_CMYK.jpg",
               "images/mode_LAB.tiff", "images/mode_YCbCr.tiff", "images/animated.gif", "images/animated.png",
               "images/multipage.tiff", "images/exif_rotate90.jpg", "images/bomb_header.png"]


def classify(rc: int, text: str) -> str:
    if "MemoryError" in text or "bad_alloc" in text or "cannot allocate" in text or rc in (-9, 137):
        return "out of memory"
    if rc == 124:
        return "timeout"
    if "Traceback" in text:
        return f"traceback ({rc})"
    if rc == 2:  # one `error:` line (inspect prints its summary first; build its progress line)
        errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
        usage = text.lstrip().startswith("Usage:")
        return "one-line (2)" if len(errors) == 1 or (usage and not errors) else f"exit 2, {len(errors)} error lines"
    return "accepted (0)" if rc == 0 else f"exit {rc}"


FORK_WORKER = r"""
import json, os, resource, sys, traceback
import vlmexport.cli as cli_mod  # imported once: every case is a fork of this warm process
from vlmexport.cli import app
import onnxruntime, torch  # noqa: F401 - warm the heavy imports before forking
cases, vmem_kb, outdir = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for i, args in enumerate(cases):
    args = [a.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape") for a in args]
    path = os.path.join(outdir, f"{i}.txt")
    pid = os.fork()
    if pid == 0:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2)
        resource.setrlimit(resource.RLIMIT_AS, (vmem_kb * 1024,) * 2)
        code = 0
        try:
            app(args, prog_name="vlmexport")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    print(json.dumps({"i": i, "rc": rc, "maxrss_kb": usage.ru_maxrss}), flush=True)
"""


def run_cli_cases(tree: Path, cases: list[list[str]], vmem_kb: int, timeout: int) -> list[tuple[str, int]]:
    """Every case in a fork of one warm process per tree (imports once), under RLIMIT_AS."""
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "300"}
    outdir = tempfile.mkdtemp(prefix="hardening-out-")
    arg = json.dumps([[a.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape") for a in c]
                      for c in cases], ensure_ascii=True)
    r = subprocess.run(["timeout", str(timeout * len(cases)), sys.executable, "-c", FORK_WORKER, arg, str(vmem_kb),
                        outdir], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    done = {d["i"]: d for d in (json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{"))}
    out = []
    for i in range(len(cases)):
        text = Path(outdir, f"{i}.txt").read_text(errors="replace") if Path(outdir, f"{i}.txt").exists() else ""
        if i not in done:
            out.append(("not run (worker died: " + (r.stderr.strip().splitlines() or ["?"])[-1][:80] + ")", 0))
            continue
        outcome = classify(done[i]["rc"], text)
        first = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("error:")), "")
        if not first and "Traceback" in text:  # the exception line
            first = next((ln for ln in reversed(text.splitlines()) if ln.strip() and not ln.startswith(" ")), "")
        out.append((outcome + (f': "{first[:90]}"' if first else ""), done[i]["maxrss_kb"] // 1024))
    shutil.rmtree(outdir, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--tree", type=Path, action="append", required=True, help="source tree (repeat: before, after)")
    ap.add_argument("--vmem-kb", type=int, default=6_000_000)
    ap.add_argument("--timeout", type=int, default=180)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hardening-table-"))
    img = work / "red.png"
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 20, 20)).save(img)
    rows: dict[str, dict] = {}
    cases = cli_cases(a.bundle.resolve(), work, img)
    for tree in a.tree:
        t = str(tree.resolve())
        results = run_cli_cases(tree.resolve(), [args for _, _, args in cases], a.vmem_kb, a.timeout)
        for (cls, name, _), (outcome, rss) in zip(cases, results):
            rows.setdefault(f"{cls}|{name}", {})[t] = f"{outcome}, {rss} MB"
            print(f"[{tree}] {cls:9} {name:45} {outcome}, peak RSS {rss} MB", flush=True)
        env = {**os.environ, "PYTHONPATH": t}
        for cls, code, argv in (("api", API, [str(a.bundle.resolve()), str(img)]),
                                ("image", IMAGES, [str(CORPUS / "expected.json")] + IMAGE_CASES)):
            r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                               cwd=tempfile.gettempdir())  # not the repo: `-c` puts the cwd first on sys.path
            res = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"(script)": r.stderr[-300:]}
            for name, outcome in res.items():
                rows.setdefault(f"{cls}|{name}", {})[t] = outcome
                print(f"[{tree}] {cls:9} {name:45} {outcome}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    if a.markdown:
        trees = [str(t.resolve()) for t in a.tree]
        lines = ["| class | input | " + " | ".join(Path(t).name for t in trees) + " |",
                 "|---|---|" + "---|" * len(trees)]
        for key, v in rows.items():
            cls, name = key.split("|", 1)
            lines.append(f"| {cls} | {name} | " + " | ".join(v.get(t, "-") for t in trees) + " |")
        a.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
