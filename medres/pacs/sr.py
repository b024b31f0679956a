"""The AI result of one study as a Comprehensive SR with the TID 1500 Measurement Report template
(highdicom), filed in the source study: what IHE AI Results asks a result to carry.

- one measurement group (TID 1501) per scored image, referencing it (source image for the group),
  with a tracking identifier and the algorithm identification (name, version, checkpoint sha256);
- the probability of each class as a numeric measurement (UCUM "1", no units), named by a local
  code `PROB-<CLASS>` in the coding scheme 99MEDRES ("Probability of <class>");
- the predicted finding(s) as qualitative evaluations `Finding` (DCM 121071) with a SNOMED CT
  concept where one exists (FINDING_CODES) and a 99MEDRES code otherwise; the conformal prediction
  set as `Prediction set member` evaluations; the input gate's out-of-distribution call as Yes/No;
- VerificationFlag UNVERIFIED, CompletionFlag COMPLETE, and Contributing Equipment (DCM 109102
  Processing Equipment: medres, the model name with the checkpoint hash, the software version).

UIDs are derived from the study, the checkpoint and the source images, so storing the same result
twice (a retry, a restart after a crash) stores the same instance, not a duplicate.
"""

from __future__ import annotations

import copy
import re

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from medres import __version__

LOCAL_SCHEME = "99MEDRES"
SERIES_NUMBER_SR = 9902
SERIES_PREFIX = "medres AI results"

# SNOMED CT concepts for class names medres users train on (lower-case names). Codes taken from
# pydicom's DICOM code dictionary where it has them, else the SNOMED CT disorder concept.
FINDING_CODES = {
    "normal": codes.SCT.Normal, "no finding": codes.SCT.Normal,
    "cardiomegaly": codes.SCT.Cardiomegaly, "effusion": codes.SCT.PleuralEffusion, "pleural effusion": codes.SCT.PleuralEffusion,
    "pneumothorax": codes.SCT.Pneumothorax, "edema": codes.SCT.PulmonaryEdema, "nodule": codes.SCT.Nodule, "mass": codes.SCT.Mass,
    "fibrosis": codes.SCT.Fibrosis,
    "pneumonia": hd.sr.CodedConcept("233604007", "SCT", "Pneumonia"),
    "atelectasis": hd.sr.CodedConcept("46621007", "SCT", "Atelectasis"),
    "emphysema": hd.sr.CodedConcept("87433001", "SCT", "Pulmonary emphysema"),
    "consolidation": hd.sr.CodedConcept("95436008", "SCT", "Lung consolidation"),
    "covid": hd.sr.CodedConcept("840539006", "SCT", "COVID-19"),
    "covid-19": hd.sr.CodedConcept("840539006", "SCT", "COVID-19"),
    "tuberculosis": hd.sr.CodedConcept("56717001", "SCT", "Tuberculosis"),
}
PREDICTION_SET = hd.sr.CodedConcept("PREDSET", LOCAL_SCHEME, "Prediction set member")
OUT_OF_DISTRIBUTION = hd.sr.CodedConcept("OOD", LOCAL_SCHEME, "Out of distribution")


def slug(name: str) -> str:
    return re.sub(r"[^A-Z0-9]+", "-", name.upper()).strip("-")[:14] or "CLASS"


def finding_concept(name: str) -> hd.sr.CodedConcept:
    code = FINDING_CODES.get(name.strip().lower())
    if code is not None:
        return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)
    return hd.sr.CodedConcept(f"F-{slug(name)}", LOCAL_SCHEME, name[:64])


def probability_concept(name: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(f"PROB-{slug(name)}", LOCAL_SCHEME, f"Probability of {name}"[:64])


def series_description(checkpoint_sha: str) -> str:
    """The marker a later run looks for in the study (idempotence): one per checkpoint."""
    return f"{SERIES_PREFIX} {checkpoint_sha[:12]}"


def result_uids(study_uid: str, checkpoint_sha: str, nonce: str = "") -> tuple[str, str]:
    """(series UID, SOP instance UID) of a study's SR: the same study and checkpoint give the same UIDs."""
    return (generate_uid(entropy_srcs=["medres-sr-series", study_uid, checkpoint_sha, nonce]),
            generate_uid(entropy_srcs=["medres-sr", study_uid, checkpoint_sha, nonce]))


def build_sr(items: list[tuple[Dataset, dict]], classes: list[str], task: str, *, checkpoint_sha: str, nonce: str = "") -> hd.sr.ComprehensiveSR:
    """`items`: (source image header, predict's output row) for each scored image of one study."""
    headers = [_with_type2(h) for h, _ in items]
    study_uid = str(headers[0].StudyInstanceUID)
    series_uid, sop_uid = result_uids(study_uid, checkpoint_sha, nonce)
    algorithm = hd.sr.AlgorithmIdentification(name="medres", version=__version__, parameters=[f"checkpoint sha256 {checkpoint_sha}"])
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=generate_uid(entropy_srcs=["medres-device", checkpoint_sha]), name="medres",
                                                       manufacturer_name="medres", model_name=f"ResNet50 {checkpoint_sha[:12]}")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    groups = [_group(i, header, row, classes, task, algorithm, sop_uid) for i, (header, row) in enumerate(items)]
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=groups,
                                     title=codes.DCM.ImagingMeasurementReport)
    equipment = hd.ContributingEquipment(manufacturer="medres", purpose_of_reference=codes.DCM.ProcessingEquipment,
                                         manufacturer_model_name=f"medres ResNet50 {checkpoint_sha[:12]}", software_versions=__version__,
                                         contribution_description="AI inference (research use only)")
    sr = hd.sr.ComprehensiveSR(evidence=headers, content=report, series_instance_uid=series_uid, series_number=SERIES_NUMBER_SR, sop_instance_uid=sop_uid,
                               instance_number=1, manufacturer="medres", is_complete=True, is_final=False, is_verified=False, contributing_equipment=[equipment])
    sr.SeriesDescription = series_description(checkpoint_sha)
    sr.SoftwareVersions = __version__
    return sr


# Patient and study attributes of Type 2 (required, may be empty) that highdicom copies from the
# evidence; many real files leave some out, and an SR must not invent them.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(header: Dataset) -> Dataset:
    header = copy.deepcopy(header)
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _group(index: int, header: Dataset, row: dict, classes: list[str], task: str, algorithm, sr_uid: str):
    source_uid = str(header.SOPInstanceUID)
    tracking = hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[sr_uid, source_uid]), identifier=f"medres image {index + 1}")
    measurements = [hd.sr.Measurement(name=probability_concept(c), value=float(row[f"prob_{c}"]), unit=codes.UCUM.NoUnits, algorithm_id=algorithm)
                    for c in classes if str(row.get(f"prob_{c}", "")) != ""]
    found = [row["prediction"]] if task == "multiclass" else [c for c in classes if str(row.get(f"positive_{c}", "")) == "1"]
    evaluations = [hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=finding_concept(c)) for c in found]
    for member in filter(None, str(row.get("prediction_set", "")).split("|")):
        evaluations.append(hd.sr.QualitativeEvaluation(name=PREDICTION_SET, value=finding_concept(member)))
    if str(row.get("in_distribution", "")) in ("0", "1"):
        evaluations.append(hd.sr.QualitativeEvaluation(name=OUT_OF_DISTRIBUTION, value=codes.SCT.Yes if str(row["in_distribution"]) == "0" else codes.SCT.No))
    source = hd.sr.SourceImageForMeasurementGroup(referenced_sop_class_uid=str(header.SOPClassUID), referenced_sop_instance_uid=source_uid)
    return hd.sr.MeasurementsAndQualitativeEvaluations(tracking_identifier=tracking, algorithm_id=algorithm, measurements=measurements,
                                                       qualitative_evaluations=evaluations, source_images=[source])


def read_probabilities(sr: Dataset) -> dict[str, dict[str, float]]:
    """{source SOP Instance UID: {class meaning: probability}} from an SR this module wrote (for checks)."""
    parsed = sr if isinstance(sr, hd.sr.ComprehensiveSR) else hd.sr.ComprehensiveSR.from_dataset(sr)
    out: dict[str, dict[str, float]] = {}
    for group in parsed.content.get_image_measurement_groups():
        source = group.source_images[0].referenced_sop_instance_uid
        out[source] = {m.name.meaning.removeprefix("Probability of "): float(m.value) for m in group.get_measurements()}
    return out
