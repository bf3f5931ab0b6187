"""3D CNNs on generated moving-digit clips: test top-1 (clips 20,000,000.., unseen) within a time budget.

    PYTHONPATH=src nice -n 10 python bench/moving_digits.py [--budget 600] [--recipe moving-digits-c3d]

Target (issue 5): top-1 >= 95% within 10 minutes on the 2-core CPU.
"""

import argparse

from _budget import run

p = argparse.ArgumentParser()
p.add_argument("--budget", type=float, default=600)
p.add_argument("--recipe", default="moving-digits-c3d")
p.add_argument("--set", action="append", default=[])
p.add_argument("--no-cap", action="store_true", help="let the budget raise the step count above the recipe's")
a = p.parse_args()
r = run(a.recipe, a.budget, a.set)
t1 = r.get("test_top1", 0.0)
print(
    f"RESULT {a.recipe}: test top-1 {t1:.4f} top-5 {r.get('test_top5', 0):.4f} in {r['wall']:.0f}s "
    f"({'meets' if t1 >= 0.95 and r['wall'] <= a.budget * 1.05 else 'misses'} the 95% / {a.budget:.0f}s target)"
)
