"""What several families share, below the families (which never import each other) and above engine, data and
models: `classes` (image batches for a classifier, the metrics and the predict records of class scores),
`adversarial` (the losses of a GAN step, for the GAN and image-to-image families), `features` (feature nets
trained once from a recipe and cached, for the domain FIDs of both) and `fid` (the standard FID of both, on the FID
Inception weights the user names).
"""
