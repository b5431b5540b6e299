"""Step-time projection of docs/scaling.md: python docs/scaling_projection.py C_CONV4 C_RESNET12
(per-task compute seconds on one GPU); prints the tables of the note."""
B = 25e9        # bytes/s: one 200 Gb/s link per worker and for the driver, each direction
ALPHA = 10e-6   # s: latency of one message (one ring hop)
F_DRIVER = 1e12 # float32 FLOP/s of the driver's CPU for the exact exchange's T x T x P Gram matrix
F_GPU64 = 1e13  # float64 FLOP/s of one GPU for its blocks' Gram matrices
D, T_PER_W = 8192, 4

def project(P, c, W):
    T, t = T_PER_W * W, T_PER_W
    ring = (W - 1) / W
    compute = t * c
    return {
        "exact": compute + (4 * P * W + 4 * P * T) / B + 2 * T * T * P / F_DRIVER,
        "sketch": compute + (8 * P * W + T * 4 * D) / B + 2 * T * T * D / F_DRIVER,
        "collective (sketch weights)": compute + 8 * P * ring / B + 2 * (W - 1) * ALPHA
            + T * 4 * D / B + 2 * T * T * D / F_DRIVER,
        "collective (exact weights)": compute + 4 * P * (t + 1) * ring / B + 2 * (W - 1) * ALPHA
            + 2 * T * T * P / W / F_GPU64 + 16 * T * T * ring / B + 2 * (W - 1) * ALPHA + 8 * T * T / B,
        "DDP all-reduce": compute + 8 * P * ring / B + 2 * (W - 1) * ALPHA,
    }

import sys
models = {"Conv-4": (113_000, float(sys.argv[1])), "ResNet-12": (12_400_000, float(sys.argv[2]))}
for name, (P, c) in models.items():
    print(f"\n{name}: P = {P/1e6:.3g}M, c = {c*1e3:.3g} ms per task, T = 4W\n")
    print("| exchange | W = 8 | W = 64 | W = 512 |\n| --- | --- | --- | --- |")
    rows = {}
    for W in (8, 64, 512):
        for k, v in project(P, c, W).items():
            rows.setdefault(k, []).append(v)
    for k, vs in rows.items():
        fmt = lambda v: f"{v*1e3:.3g} ms" if v < 1 else f"{v:.3g} s"
        print(f"| {k} | " + " | ".join(fmt(v) for v in vs) + " |")
