"""Optimizer state bytes per parameter for Prodigy by slice_p and state_dtype (docs/performance.md)."""
import torch, optimkit
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 256), torch.nn.Linear(256, 512))
n = sum(p.numel() for p in m.parameters())
for sp in (1, 3, 11):
    row = []
    for sd in (None, torch.bfloat16):
        o = optimkit.Prodigy(m.parameters(), slice_p=sp, state_dtype=sd)
        m(torch.randn(8, 512)).sum().backward(); o.step(); m.zero_grad()
        b = sum(v.numel() * v.element_size() for st in o.state.values() for k, v in st.items() if torch.is_tensor(v) and k != "step")
        row.append(b / n)
    print(f"slice_p={sp}: {row[0]:.2f} B/param fp32 state, {row[1]:.2f} bf16 state")
