"""The implementation behind `utils.py`, one module per capability; import the measurements from `utils`.

plumbing       flat parameter vectors, functional loss, chunking, seeded draws, the plain-MLP test
points         the loss at many parameter points (`point_evaluator`): reference and MLP fast path
hessian        Hessian-vector products (`hessian_operator`): reference and MLP fast path; dense Hessian
spectrum       Lanczos, eigenpairs, traces, spectral density, per-layer curvature
flatness       filter normalisation, average-case, worst-case and PAC-Bayes flatness, rescaling
noise          per-example gradients (reference and MLP fast path), gradient noise scales
connectivity   barriers, interpolation, weight matching, Bézier curves
surfaces       2-D loss slices and planes through three points
exact          the dense float64 answers that `--exact` sets beside every estimate
distributed    data slices and point shares over torch.distributed processes (`DataShard`, `PointShare`)
files          the one atomic writer every file of the project goes through
dynamics       gradient descent's stability threshold and the edge of stability read off a curvature series
losses         the training losses by name (cross-entropy, Cohen et al.'s MSE)
store          the stage store: finished stages kept on disk, keyed by their settings, inputs and code
"""
