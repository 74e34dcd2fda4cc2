"""Write tests/formula/type3_data.csv: covariates and three responses for the type III test
(tests/formula/test_type3_r.py), then `Rscript tests/formula/make_r_type3.R` records lmerTest.

    python3 tests/formula/make_type3_data.py      (from the repository root; seeded)
"""

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> None:
    rng = np.random.default_rng(31)
    n_sub, visits = 60, 2
    sub = np.repeat(np.arange(n_sub), visits)
    sex = rng.choice(["F", "M"], n_sub)[sub]
    group = rng.choice(["ctl", "patA", "patB"], n_sub, p=[0.45, 0.3, 0.25])[sub]
    site = rng.choice(["s1", "s2", "s3"], n_sub)[sub]
    time = np.tile(np.arange(visits, dtype=float), n_sub) + rng.uniform(-0.1, 0.1, sub.size)
    age = rng.normal(50, 10, n_sub)[sub] + time
    u = rng.normal(0, 1, n_sub)[sub]
    ys = []
    for k in range(3):
        mu = (10 + 0.05 * age + 0.3 * k * (group == "patA") - 0.4 * (group == "patB")
              + 0.5 * (sex == "M") * (group == "patB") * k + 0.2 * time * (group == "patA")
              + 0.3 * (site == "s2"))
        ys.append(mu + u + rng.normal(0, 1, sub.size))
    with open(HERE / "type3_data.csv", "w") as fh:
        fh.write("subject,visit,age,time,sex,group,site,y1,y2,y3\n")
        for i in range(sub.size):
            fh.write(f"s{sub[i]:02d},{i % visits + 1},{age[i]:.6f},{time[i]:.6f},{sex[i]},"
                     f"{group[i]},{site[i]}," + ",".join(f"{y[i]:.6f}" for y in ys) + "\n")


if __name__ == "__main__":
    main()
