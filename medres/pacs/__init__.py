"""Scoring studies where they live: a PACS over DICOMweb (QIDO/WADO/STOW-RS) or DIMSE (C-ECHO,
C-FIND, C-GET, C-STORE), and the AI results stored back into the source study.

servers  — `SERVER` strings and the servers file, credentials from the environment, TLS
clients  — one interface, two protocols: echo, find studies, list series, retrieve, store
sr       — the Comprehensive SR (TID 1500 measurement report) of one study's scores
score    — `medres pacs score`: find → retrieve → the predict path → SR (+ Grad-CAM SC) → store back
listen   — `medres listen`: a storage SCP that spools durably and scores a study once it is quiet
"""
