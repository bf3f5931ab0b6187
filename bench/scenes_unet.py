"""U-Net on generated driving scenes: test mIoU (scenes 20,000,000.. never seen in training) within a budget.

    PYTHONPATH=src nice -n 10 python bench/scenes_unet.py [--budget 600] [--recipe scenes-unet] [--set k=v ...]

Target (issue 5): mIoU >= 0.85 within 10 minutes on the 2-core CPU. The step count is fitted to the budget
from a measured step time, so a slower (shared) machine trains fewer steps rather than overrunning.
"""

from _budget import budget_args, run

a = budget_args("scenes-unet", 600)
r = run(a.recipe, a.budget, a.set, no_cap=a.no_cap)
m = r.get("test_miou", 0.0)
print(
    f"RESULT {a.recipe}: test mIoU {m:.4f} pixel acc {r.get('test_pixel_acc', 0):.4f} in {r['wall']:.0f}s "
    f"({'meets' if m >= 0.85 and r['wall'] <= a.budget * 1.05 else 'misses'} the 0.85 / {a.budget:.0f}s target)"
)
