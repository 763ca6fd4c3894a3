"""GPU experiment: throughput of batched float64 eigh (the exact scorer's core) with one
call vs several CUDA streams fed from threads, at D=768 and 384."""
import threading, time, torch

def bench(d, batch=256, streams=1, dtype=torch.float64):
    g = torch.randn(batch, d, d + 64, device="cuda", dtype=dtype)
    a = g @ g.transpose(1, 2)
    chunks = a.chunk(streams)
    ss = [torch.cuda.Stream() for _ in chunks]
    def work(c, s):
        with torch.cuda.stream(s):
            torch.linalg.eigh(c)
    for rep in range(2):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        th = [threading.Thread(target=work, args=(c, s)) for c, s in zip(chunks, ss)]
        [t.start() for t in th]; [t.join() for t in th]
        torch.cuda.synchronize(); dt = time.perf_counter() - t0
    print(f"d={d} {dtype} streams={streams}: {batch/dt:.0f} matrices/s", flush=True)

for d in (768, 384):
    for streams in (1, 4, 16):
        bench(d, streams=streams)
bench(768, streams=1, dtype=torch.float32)
bench(768, streams=16, dtype=torch.float32)
