"""The napari plug-in (`pip install "qmedsam[napari]"`): draw a box, get its mask, in-process on a CPU.

`widget.SegmentWidget` is the dock widget (a thin Qt layer over `qmedsam.Segmenter`); `layers` turns
napari shapes into the project's boxes and back; `io` reads cases and NIfTI scans, writes results and
provides the demo cases as napari sample data. The manifest is `napari.yaml`.
"""
