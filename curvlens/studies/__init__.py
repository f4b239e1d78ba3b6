"""Studies: questions answered from many merges or many frames at once.

Sweeps of merge + evaluate jobs (``sweep``, on dask when asked), greedy soups
(``soup``), Pareto fronts of task-arithmetic coefficients (``fronts``), FFG vs
magnitude grafting (``graft``), the experts' regime (``regime``), whether the
predicted loss ranks merges as scores do (``prediction``), the paper's claims
decided from the frames (``findings``) and the empirical Fisher against Adam's
second moments (``fisher_vs_adam``). Each returns tidy frames the views draw.
"""
