"""The paper's published numbers (Xiao et al. 2016, CUHK-SYSU, gallery 100), shown beside ours
in `psearch paper`'s report and always labelled as the paper's.

Percent, (mAP, top-1). Table 2: detectors (ACF, Deep, GT) x re-id features; "Ours" is the
end-to-end net, one cell. Table 3: the occlusion and low-resolution subsets against the whole
test set. Fig. 6 and Fig. 7(b) are curves: the text gives only the values quoted below.
"""

from __future__ import annotations

CITATION = "Xiao et al., End-to-End Deep Learning for Person Search, 2016 (CUHK-SYSU)"

# Table 2: (detector, re-id) -> (mAP, top-1).
TABLE2: dict[tuple[str, str], tuple[float, float]] = {
    ("ACF", "Euclidean"): (21.7, 25.9),
    ("Deep", "Euclidean"): (28.0, 33.0),
    ("GT", "Euclidean"): (41.1, 45.9),
    ("ACF", "KISSME"): (32.3, 38.1),
    ("Deep", "KISSME"): (39.1, 44.9),
    ("GT", "KISSME"): (56.2, 61.9),
    ("ACF", "BoW"): (42.4, 48.4),
    ("Deep", "BoW"): (48.3, 54.1),
    ("GT", "BoW"): (62.5, 67.2),
    ("ACF", "IDNet"): (47.3, 53.3),
    ("Deep", "IDNet"): (52.6, 59.0),
    ("GT", "IDNet"): (66.5, 71.1),
    ("Ours", "Ours"): (55.7, 62.7),
}

# Table 3: method -> subset -> (mAP, top-1).
TABLE3: dict[str, dict[str, tuple[float, float]]] = {
    "Deep+KISSME": {
        "whole": (39.1, 44.9),
        "occlusion": (18.2, 17.7),
        "low_resolution": (43.8, 42.8),
    },
    "ACF+BoW": {"whole": (42.4, 48.4), "occlusion": (29.1, 32.1), "low_resolution": (44.9, 53.8)},
    "Ours": {"whole": (55.7, 62.7), "occlusion": (39.7, 43.3), "low_resolution": (35.7, 42.1)},
}

# Fig. 6 (Sec. 5.4), from the text: test mAP after training from the IDNet initialisation.
FIG6_TEXT = (
    "the paper's Fig. 6 (5,532 training identities): with the IDNet initialisation the plain "
    "softmax's test mAP 'converges to about 40%', the RSS loss's 'to about 55%', and the RSS "
    "training loss falls much faster"
)
FIG6_MAP = {"softmax": 40.0, "rss": 55.0}

# Fig. 7(b) (Sec. 5.5): top-1 against gallery sizes 50 ... 4,000; no values are printed.
FIG7B_TEXT = (
    "the paper's Fig. 7(b) (gallery 50 to 4,000, ours and Deep+BoW): 'the top-1 accuracies "
    "drop by half for both the methods'; the curve's values are not printed in the text"
)

# CBGM's own gains (Li & Miao, SeqNet, AAAI 2021; NAE+SeqNet, mAP %): without -> with CBGM.
SEQNET_CBGM_TEXT = (
    "SeqNet's CBGM *(SeqNet paper)* raised mAP from 93.8 to 94.8 on CUHK-SYSU and from 46.7 to "
    "47.6 on PRW, where people reappear with the people they came with"
)
