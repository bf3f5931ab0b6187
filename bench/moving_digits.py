"""3D CNNs on generated moving-digit clips: test top-1 (clips 20,000,000.., unseen) within a time budget.

    PYTHONPATH=src nice -n 10 python bench/moving_digits.py [--budget 600] [--recipe moving-digits-c3d]

Target (issue 5): top-1 >= 95% within 10 minutes on the 2-core CPU.
"""

from _budget import budget_args, run

a = budget_args("moving-digits-c3d", 600)
r = run(a.recipe, a.budget, a.set, no_cap=a.no_cap)
t1 = r.get("test_top1", 0.0)
print(
    f"RESULT {a.recipe}: test top-1 {t1:.4f} top-5 {r.get('test_top5', 0):.4f} in {r['wall']:.0f}s "
    f"({'meets' if t1 >= 0.95 and r['wall'] <= a.budget * 1.05 else 'misses'} the 95% / {a.budget:.0f}s target)"
)
