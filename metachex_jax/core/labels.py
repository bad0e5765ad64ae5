"""Label vocabularies shared by the data pipeline, the model heads and the evaluation."""

# The 14 ChestX-ray14 pathologies, spelled exactly as in Data_Entry_2017*.csv, in CheXNet's order.
PATHOLOGIES = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"

# A dataset's label names that are NIH labels under another name (data/input/mixture.py maps labels by name after
# these).
# CheXpert's other observations keep their own names (extra labels); PadChest's builder writes NIH's names itself
# (data/raw/padchest.py: LABEL_FINDINGS); a CSV column is the label its header names.
# MIMIC-CXR's labels are CheXpert's; VinDr-CXR's: three NIH labels under other names, and its "No finding" is
# CheXpert's "No Finding" (VinDr's other labels keep their names: Nodule/Mass has no single NIH counterpart).
LABEL_ALIASES = {"chexpert": {"Pleural Effusion": "Effusion"}, "mimic": {"Pleural Effusion": "Effusion"},
                 "vindr": {"Pleural effusion": "Effusion", "Pleural thickening": "Pleural_Thickening",
                           "Pulmonary fibrosis": "Fibrosis", "No finding": NO_FINDING}}

# The binary metadata head: one logit per entry, positive class named by the entry.
#   view_ap:  1 = AP (anterior-posterior), 0 = PA (posterior-anterior)
#   sex_male: 1 = male, 0 = female
METADATA_TASKS = ("view_ap", "sex_male")

# Ages outside this range (years) are treated as missing: the 2017 NIH CSV has a few impossible ages.
PLAUSIBLE_AGE_YEARS = (0.0, 110.0)
