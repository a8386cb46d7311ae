"""The packed MoVE encoder with the fused Triton FFN (run by Triton's CPU interpreter) against the reference.

Runs in a child process: TRITON_INTERPRET must be set before Triton is first imported.
"""
import subprocess
import sys
import textwrap

import pytest
from _interp import interp_env

CHILD = textwrap.dedent("""
    import torch, medst_fast
    from medst_fast.config import VisionCfg
    from medst_fast.models.move_vit import MoVEViT
    torch.manual_seed(0)
    vit = MoVEViT(VisionCfg(img_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_ratio=2.0))
    f, l = torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32)
    has = torch.tensor([True, False, True])
    def run(dtype, backend):
        medst_fast.set_backend(backend)
        m = vit.to(dtype)
        fi, li = f.to(dtype).requires_grad_(), l.to(dtype).requires_grad_()
        cls, pat = m(fi, li, has, packed=True)
        loss = cls.float().square().sum() + (pat[:, :16].float() * 0.1).sum()
        g = torch.autograd.grad(loss, [fi, li] + list(m.parameters()))
        return [cls.float(), pat[:, :16].float()] + [x.float() for x in g]
    ref = run(torch.float64, "torch")
    tri = run(torch.bfloat16, "triton")
    plain = run(torch.bfloat16, "torch")
    worst = 0.0
    for r, t, p in zip(ref, tri, plain):
        et, ep = (t - r.float()).abs().max().item(), (p - r.float()).abs().max().item()
        worst = max(worst, et / (ep + 1e-6))
        assert et <= 2 * ep + 1e-3 * r.abs().max().item() + 1e-6, (et, ep)
    print("OK", worst)
""")


def test_packed_encoder_with_fused_ffn_under_interpreter():
    pytest.importorskip("triton")
    env = interp_env()  # TRITON_INTERPRET=1 + the Triton 3.6 / numpy >= 2.4 start-up fix
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "OK" in out.stdout
