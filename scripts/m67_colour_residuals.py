"""MIST main-sequence colour residuals of M67 members at fixed parameters (the numbers in
docs/performance.md, "Real data: M67"): python scripts/m67_colour_residuals.py"""
import sys

import numpy as np

sys.path.insert(0, 'scripts')
from m67_feh_compare import DEFAULT, ms_colour_residuals

from clusterhbm.catalogue import read_catalogue
from clusterhbm.fit import prepare_data
from clusterhbm.grid import load_grid

grid = load_grid()
cat = read_catalogue(DEFAULT)
fd = prepare_data(cat, g_lim=18.0, member_prob_column=None)
lit = dict(zip(np.asarray(cat["source_id"]), np.asarray(cat["member"], bool)))
member = np.array([lit[x] for x in fd.source_id])
m = np.asarray(fd.data.mag); g = m[:, 0]; c = m[:, 1] - m[:, 2]
edges = np.arange(13.5, 18.01, 0.5)
for name, med in [("literature: 9.58, +0.03, 867 pc, A_V 0.115", {'log_age': 9.58, 'feh': 0.03, 'distance_pc': 867., 'av_mag': 0.115}),
                  ("literature with A_V 0", {'log_age': 9.58, 'feh': 0.03, 'distance_pc': 867., 'av_mag': 0.0}),
                  ("free fit", {'log_age': 9.425, 'feh': 0.433, 'distance_pc': 868., 'av_mag': 0.0006})]:
    r = ms_colour_residuals(med, g, c, member, np.ones(len(g)), grid, edges)
    print(name, " ".join(f"{x['g_lo']:.1f}:{x['p25_members']:+.3f}" for x in r))
