"""One label vocabulary across the public chest X-ray archives.

Each archive's own finding names map onto these shared names (the table below is the README's; a test
checks that every mapping lands in VOCABULARY). A shared label an archive does not report is written
blank — *missing*, masked in training and evaluation — never 0. An archive's other findings stay
as columns under their own names (CheXpert's `Support Devices`, VinDr-CXR's `Aortic enlargement`, …).

The names follow torchxrayvision's `default_pathologies` where they exist (so NIH `Effusion` =
CheXpert/MIMIC `Pleural Effusion` = VinDr `Pleural effusion` = PadChest `pleural effusion`), written
with spaces (`Pleural Thickening`, not `Pleural_Thickening`).
"""

from __future__ import annotations

VOCABULARY = (
    "No Finding", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Enlarged Cardiomediastinum",
    "Fibrosis", "Fracture", "Hernia", "Infiltration", "Lung Lesion", "Lung Opacity", "Mass", "Nodule", "Pleural Other",
    "Pleural Thickening", "Pneumonia", "Pneumothorax", "Support Devices", "Tuberculosis", "COVID-19",
)

# Archive name → shared name, for names that differ; names equal to a VOCABULARY entry map to themselves.
NIH = {"Pleural_Thickening": "Pleural Thickening"}
CHEXPERT = {"Pleural Effusion": "Effusion"}  # MIMIC-CXR-JPG's CheXpert/NegBio labels use the same names
VINDR = {
    "Pleural effusion": "Effusion", "Pleural thickening": "Pleural Thickening", "Pulmonary fibrosis": "Fibrosis", "No finding": "No Finding",
}
# VinDr-CXR labels that are also a shared label's positive evidence (any one of them makes it positive).
VINDR_ANY = {"Fracture": ("Rib fracture", "Clavicle fracture")}
# PadChest: lower-case report findings; a shared label is positive when one of the image's findings
# contains its name or a synonym (torchxrayvision's PC_Dataset rule). `normal` is No Finding.
PADCHEST = {
    "Atelectasis": ("atelectasis",), "Cardiomegaly": ("cardiomegaly",), "Consolidation": ("consolidation", "air bronchogram"),
    "Edema": ("edema",), "Effusion": ("effusion",), "Emphysema": ("emphysema",), "Fibrosis": ("fibrosis",), "Fracture": ("fracture",),
    "Hernia": ("hernia",), "Infiltration": ("infiltrates", "interstitial pattern", "ground glass pattern", "reticular interstitial pattern",
                                           "reticulonodular interstitial pattern", "alveolar pattern", "consolidation", "air bronchogram"),
    "Mass": ("mass",), "Nodule": ("nodule",), "Pleural Thickening": ("pleural thickening",), "Pneumonia": ("pneumonia",),
    "Pneumothorax": ("pneumothorax",), "Support Devices": ("device", "pacemaker"),
    "Tuberculosis": ("tuberculosis",), "No Finding": ("normal",),
}
# covid-chestxray-dataset: components of the `finding` path (`Pneumonia/Viral/COVID-19`).
COVID = {"Pneumonia": "Pneumonia", "COVID-19": "COVID-19", "Tuberculosis": "Tuberculosis", "No Finding": "No Finding"}


def shared(name: str, table: dict[str, str]) -> str | None:
    """The shared name of an archive's label, or None when it is the archive's own."""
    name = table.get(name, name)
    return name if name in VOCABULARY else None


def table_md() -> str:
    """The harmonised label table (README): one row per shared label, what each archive calls it."""
    from medres.archives import ARCHIVES

    rows = ["| shared label | " + " | ".join(a.name for a in ARCHIVES.values()) + " |", "|---" * (len(ARCHIVES) + 1) + "|"]
    for label in VOCABULARY:
        rows.append(f"| {label} | " + " | ".join(a.label_names.get(label, "—").replace("|", "/") for a in ARCHIVES.values()) + " |")
    return "\n".join(rows) + "\n"
