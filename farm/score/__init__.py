"""Judging a run: scores for every rendered image, stored beside the manifest, and the report.

    faces   likeness / leakage: dlib's face identity against the subject's training photos
    clip    CLIP-T (image vs prompt without the subject token) and CLIP-I (image vs training photos)
    scorer  both on a batch of manifest rows, models loaded once per process (a worker keeps one)
    table   the scores dataset (OUT/scores/part-*.parquet), joined with the manifest by task id
    report  per variant × checkpoint means and spreads, the ranking and its rule, plots
    page    the static results page: any axes as rows/columns/pages, full images with PNG info and
            scores, heat maps, the report (OUT/results/index.html, works from file://)

Scores never change the manifest: `farm score RUN` can run again, or later on an old run.
"""
