"""The onnxruntime backend's arena shrinking (SHRINK_ARENA on the vision runs and prefills), on or off:
image encode, prefill and decode times (median of requests 2-4) and the peak RSS above the loaded
weights, for the longest bench-s prompt (5 images + text to the 1,024-token context).

    python benchmarks/arena_shrink.py shrink int4; python benchmarks/arena_shrink.py keep int4

Needs the bench-s bundle at /tmp/bs/bundle (docs/deployment.md says how to build it). Run the two
modes alternately on a quiet machine; figures in docs/deployment.md.
"""
import sys, time, numpy as np
mode, prec = sys.argv[1], sys.argv[2]
import vlmexport.runtimes.onnxruntime_backend as ob
if mode == "keep":  # every arena kept (onnxruntime's default): run options without shrinkage
    import onnxruntime as ort
    ob.SHRINK_ARENA = ort.RunOptions()
from pathlib import Path
def st(k):
    for l in Path("/proc/self/status").read_text().splitlines():
        if l.startswith(k+":"): return int(l.split()[1])/1024
import vlmexport
from vlmexport.core.prompt import Turn
pipe = vlmexport.load("/tmp/bs/bundle", backend="onnxruntime", precision=prec, verify="none", threads=2)
size = pipe.preprocess_config.image_size
rng = np.random.default_rng(0)
pics = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(5)]
prompt = "<image>"*5 + " red"*2
lay, px = pipe.prepare([Turn(prompt, images=5)], pics)
lay, px = pipe.prepare([Turn(prompt + " red"*max(0, 1015-len(lay)), images=5)], pics)
s = pipe.session
loaded = st("VmRSS")
E, P, D = [], [], []
for it in range(4):
    s.reset()
    t=time.perf_counter(); emb = s.encode_images(px); E.append(time.perf_counter()-t)
    t=time.perf_counter(); s.prefill(lay, emb); P.append(time.perf_counter()-t)
    t=time.perf_counter()
    for i in range(8): s.decode(5, lay.next_position+i)
    D.append((time.perf_counter()-t)/8)
med = lambda x: sorted(x[1:])[len(x[1:])//2]  # requests 2-4 (the first warms up)
print(f"{mode} {prec}: encode {med(E)*1000:.0f} ms, prefill {med(P)*1000:.0f} ms, decode {med(D)*1000:.1f} ms/token, peak above loaded {st('VmHWM')-loaded:.0f} MB")
