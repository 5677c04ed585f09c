"""One line per probe log: final accuracy, final test loss, max weight norm, median rel_err."""
import json
import statistics
import sys

for path in sys.argv[1:]:
    recs = [json.loads(l) for l in open(path) if l.startswith("{")]
    steps = [r for r in recs if "step" in r]
    s = recs[-1]
    a = s["summary"]
    rel = [r["rel_err"] for r in steps if r["step"] > 0]
    print(f"{a['method']:10s} d={a['density']:<6} lr={a['lr']:<6} mom={a['momentum']:<4} eta={a['eta']:<4} seed={a['seed']} "
          f"acc={100 * s['final_acc']:5.1f}% test_loss={s['final_loss']:.3f} max|w|={max(r['w_norm'] for r in steps):7.1f} "
          f"rel_err med={statistics.median(rel):.3f} @100={steps[1]['rel_err']:.3f} @500={steps[5]['rel_err']:.3f}")
