"""Device-machine measurements for docs/readme/speed.md (temporary; not part of the repo)."""
import json, os, sys, time, types, dataclasses, multiprocessing as mp, shutil, hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np
sys.path.insert(0, os.getcwd())
SMALL = os.environ.get("SMALL") == "1"
# The device image has no pydantic: stand in a dataclass for AugmentConfig before importing augment.
try:
    import pydantic  # noqa: F401
except ImportError:
    stub = types.ModuleType("src.config")
    @dataclasses.dataclass
    class AugmentConfig:
        crop_scale_min: float = 0.7; hflip: float = 0.5; color_jitter: float = 0.2
        rotation_degrees: float = 10.0; random_erasing: float = 0.25
    stub.AugmentConfig = AugmentConfig
    sys.modules["src.config"] = stub
import torch
from PIL import Image
from src.config import AugmentConfig
from src.data import cache as cache_mod
from src.data.cache import decode_for_cache, load_or_build_cache
from src.data.augment import BatchAugment, IMAGENET_MEAN, IMAGENET_STD
OUT = Path(os.environ.get("OUT", "/tmp/out")); OUT.mkdir(parents=True, exist_ok=True)
WORK = Path("/tmp/speedwork"); RESULTS = {}
def say(key, value):
    RESULTS[key] = value; print(f"{key}: {value}", flush=True)
    (OUT / "results.json").write_text(json.dumps(RESULTS, indent=1))

def gen(args):
    i, out = args
    rng = np.random.default_rng(i)
    w, h = rng.integers(150, 500, size=2)
    base = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.int16)
    arr += rng.normal(0, 8, size=(h, w, 3)).astype(np.int16)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(f"{out}/img{i:05d}.png")

def decode_threads(paths, cache_size, workers):
    from functools import partial
    with ThreadPoolExecutor(max(1, workers)) as pool:
        yield from pool.map(partial(cache_mod._decode_or_reason, cache_size=cache_size), paths)

def timed_build(rows, raw, cdir, size, workers, threads=False):
    shutil.rmtree(cdir, ignore_errors=True)
    original = cache_mod._decode_all
    if threads:
        cache_mod._decode_all = decode_threads
    try:
        t = time.perf_counter(); c = load_or_build_cache(rows, raw, cdir, size, workers)
        return time.perf_counter() - t, c
    finally:
        cache_mod._decode_all = original

def best(fn, reps):
    fn(); times = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times) * 1e3, float(np.median(times)) * 1e3

def v2_pipeline(size, cfg):
    import torchvision.transforms.v2 as v2
    return v2.Compose([v2.RandomResizedCrop(size, scale=(cfg.crop_scale_min, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(cfg.hflip), v2.RandomRotation(cfg.rotation_degrees),
                       v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                       v2.RandomErasing(cfg.random_erasing, scale=(0.02, 0.2))])

def cpu_section(rows, raw):
    os.sched_setaffinity(0, {0, 1}); torch.set_num_threads(2)
    say("cpu_section_affinity", sorted(os.sched_getaffinity(0)))
    paths = [raw / r for r, _ in rows]
    n = 150 if SMALL else 600
    t = time.perf_counter(); [decode_for_cache(p, 256) for p in paths[:n]]
    say("decode_for_cache_256_img_per_s_one_core", round(n / (time.perf_counter() - t), 1))
    t = time.perf_counter(); [cache_mod.load_rgb(p) for p in paths[:n]]
    say("load_rgb_only_img_per_s_one_core", round(n / (time.perf_counter() - t), 1))
    sub = rows[: (300 if SMALL else 2000)]
    for workers in (1, 2):
        for threads in (False, True):
            dt, c = timed_build(sub, raw, WORK / "c2", 256, workers, threads)
            say(f"build_2cores_{len(sub)}imgs_workers{workers}_{'threads' if threads else 'processes'}_s", round(dt, 2))
    t = time.perf_counter(); again = load_or_build_cache(sub, raw, WORK / "c2", 256, 2)
    say(f"reuse_2cores_{len(sub)}imgs_s(hash+verify)", round(time.perf_counter() - t, 3)); assert not again.built
    t = time.perf_counter(); cache_mod._content_digests(paths[:len(sub)], 2)
    say(f"hash_2cores_{len(sub)}files_s", round(time.perf_counter() - t, 3))
    t = time.perf_counter(); cache_mod._chunk_checksums(again.path)
    say(f"crc_2cores_{again.path.stat().st_size >> 20}MiB_s", round(time.perf_counter() - t, 3))
    cfg = AugmentConfig()
    for threads in (2, 1):
        torch.set_num_threads(threads)
        for size, cache in ((112, 128), (224, 256)):
            x = torch.randint(0, 256, (64, cache, cache, 3), dtype=torch.uint8)
            aug = BatchAugment(cfg, size); g = torch.Generator().manual_seed(0)
            tv = v2_pipeline(size, cfg); xchw = x.permute(0, 3, 1, 2)
            say(f"cpu{threads}t_{size}px_b64_batchaugment_train_ms(best,median)", best(lambda: aug.train(x, g), 10))
            say(f"cpu{threads}t_{size}px_b64_batchaugment_eval_ms(best,median)", best(lambda: aug.eval(x), 10))
            say(f"cpu{threads}t_{size}px_b64_tv_v2_per_sample_ms(best,median)", best(lambda: torch.stack([tv(im) for im in xchw]), 3))
    import torchvision
    torch.set_num_threads(2)
    for size, steps in ((112, 3), (224, 2)):
        model = torchvision.models.resnet18(num_classes=87).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), 1e-4)
        x = torch.randn(64, 3, size, size).contiguous(memory_format=torch.channels_last); y = torch.randint(0, 87, (64,))
        def step():
            loss = torch.nn.functional.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        say(f"cpu2t_resnet18_train_step_{size}px_b64_ms(best,median)", best(step, 1 if SMALL else steps))

def full_section(rows, raw):
    os.sched_setaffinity(0, set(range(os.cpu_count()))); torch.set_num_threads(os.cpu_count())
    w = os.cpu_count()
    for threads in (False, True):
        dt, c = timed_build(rows, raw, WORK / "cfull", 256, w, threads)
        say(f"build_{w}cores_{len(rows)}imgs_{'threads' if threads else 'processes'}_s", round(dt, 2))
    say("cache_file_bytes", c.path.stat().st_size)
    t = time.perf_counter(); again = load_or_build_cache(rows, raw, WORK / "cfull", 256, w)
    say(f"reuse_{w}cores_{len(rows)}imgs_s(hash+verify)", round(time.perf_counter() - t, 3)); assert not again.built
    t = time.perf_counter(); cache_mod._chunk_checksums(again.path)
    say(f"crc_{w}threads_cap8_s", round(time.perf_counter() - t, 3))
    t = time.perf_counter(); cache_mod._content_digests([raw / r for r, _ in rows], w)
    say(f"hash_{w}threads_{len(rows)}files_s", round(time.perf_counter() - t, 3))
    return again

def gpu_section(cached):
    if not torch.cuda.is_available():
        say("gpu", "none"); return
    dev = torch.device("cuda"); say("gpu", torch.cuda.get_device_name())
    cfg = AugmentConfig(); g = torch.Generator(device=dev).manual_seed(0)
    images = cached.images.to(dev)
    for size, cache_size, batch in ((224, 256, 128), (224, 256, 256), (112, 128, 256)):
        src = images if cache_size == 256 else torch.nn.functional.interpolate(
            images[:4096].permute(0, 3, 1, 2).float(), size=128, antialias=True, mode="bilinear").round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        aug = BatchAugment(cfg, size)
        idx = torch.randint(0, src.shape[0], (batch,), device=dev, generator=g)
        x = src[idx]
        for _ in range(3): aug.train(x, g); aug.eval(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = aug.train(src[torch.randint(0, src.shape[0], (batch,), device=dev, generator=g)], g); aug.eval(x)
            say(f"gpu_no_sync_{size}px_b{batch}", "ok (sync_debug_mode=error raised nothing)")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for name, fn in (("train", lambda: aug.train(x, g)), ("eval", lambda: aug.eval(x))):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50): fn()
            end.record(); torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 50
            say(f"gpu_{size}px_b{batch}_{name}_ms", round(ms, 3)); say(f"gpu_{size}px_b{batch}_{name}_img_per_s", round(batch / ms * 1e3))
        if batch == 128:
            tv = v2_pipeline(size, cfg); xchw = x.permute(0, 3, 1, 2)
            def per_sample(): torch.stack([tv(im) for im in xchw])
            per_sample(); torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(3): per_sample()
            torch.cuda.synchronize(); say(f"gpu_{size}px_b{batch}_tv_v2_per_sample_ms", round((time.perf_counter() - t) / 3 * 1e3, 1))
    say("gpu_cache_tensor_MiB", round(images.numel() / 2**20))

if __name__ == "__main__":
    n = 600 if SMALL else 7150
    raw = WORK / "raw"; raw.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with mp.Pool(os.cpu_count()) as pool: pool.map(gen, [(i, raw) for i in range(n)], chunksize=32)
    say("generated_images", n); say("generate_s", round(time.perf_counter() - t, 1))
    say("raw_bytes_MiB", round(sum(p.stat().st_size for p in raw.iterdir()) / 2**20))
    rows = [(f"img{i:05d}.png", f"id{i % 87}") for i in range(n)]
    say("python", sys.version.split()[0]); say("torch", torch.__version__); say("cpus", os.cpu_count())
    cpu_section(rows, raw)
    cached = full_section(rows, raw)
    gpu_section(cached)
