import torch
b = torch.load("/root/s11-reference/run/best.pt", weights_only=True, map_location="cpu")
l = torch.load("/root/s11-reference/run/last.pt", weights_only=True, map_location="cpu")
print("best keys", list(b)[:8], "epoch", b.get("epoch"))
print("last epoch", l.get("epoch"), "lr", [g["lr"] for g in l["optimizer"]["param_groups"]])
print("scheduler", {k: v for k, v in l["scheduler"].items() if k in ("best", "num_bad_epochs", "_last_lr", "mode")})
bm, lm = b["model"], l["model"]
def norm(sd, pred): return sum(v.float().norm()**2 for k, v in sd.items() if pred(k)) ** 0.5
for name, pred in [("all", lambda k: True), ("conv", lambda k: "conv" in k or "shortcut.0" in k), ("norm w", lambda k: "norm" in k and k.endswith("weight")), ("linear", lambda k: k.startswith("linear"))]:
    print(f"{name:8s} epoch3 {norm(bm, pred):10.3f}  epoch4 {norm(lm, pred):10.3f}")
big = sorted(((v.float().abs().max().item(), k) for k, v in lm.items()), reverse=True)[:5]
print("largest |w| at epoch 4:", [(k, round(m, 2)) for m, k in big])
big3 = sorted(((v.float().abs().max().item(), k) for k, v in bm.items()), reverse=True)[:5]
print("largest |w| at epoch 3:", [(k, round(m, 2)) for m, k in big3])
mom = l["optimizer"]["state"]
print("momentum max", max(s["momentum_buffer"].abs().max().item() for s in mom.values()))
