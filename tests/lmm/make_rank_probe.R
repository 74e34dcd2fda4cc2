# lme4 reference for tests/lmm/rank_probe.csv: four voxels of a cohort audit (crossed
# y ~ age + time + (1 + time | subject) + (1 | scanner), 48 subjects with 2-5 visits, a
# scanner drawn per visit from 6, 10-60% of each voxel's rows missing) whose subject
# intercept and slope end perfectly correlated (D_subject of rank one), where mpiblmm's
# quasi-Newton crept for 133-300 iterations before the rank probe.  REML and ML, best of the
# default optimiser, bobyqa and Nelder_Mead (both with tight tolerances).
# Run from the repository root: Rscript tests/lmm/make_rank_probe.R
# (R 4.2.2, lme4 1.1-31, jsonlite 1.8.4)
suppressMessages({library(lme4); library(jsonlite)})
d <- read.csv("tests/lmm/rank_probe.csv")
controls <- list(default = lmerControl(),
                 bobyqa = lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-10)),
                 Nelder_Mead = lmerControl(optimizer = "Nelder_Mead",
                                           optCtrl = list(FtolAbs = 1e-12, FtolRel = 1e-12)))
out <- list()
for (method in c("REML", "ML")) for (v in grep("^y", names(d), value = TRUE)) {
  dd <- d[!is.na(d[[v]]), ]
  dd$y <- dd[[v]]
  fits <- lapply(controls, function(ctrl)
    suppressWarnings(lmer(y ~ age + time + (1 + time | subject) + (1 | scanner), data = dd,
                          REML = method == "REML", control = ctrl)))
  ll <- sapply(fits, function(f) as.numeric(logLik(f)))
  m <- fits[[which.max(ll)]]
  out[[paste(method, v, sep = "_")]] <- list(
    logLik = max(ll), logLik_default = ll[["default"]], singular = isSingular(m),
    sigma2 = sigma(m)^2, beta = unname(fixef(m)), n = nrow(dd))
}
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE),
           "tests/lmm/rank_probe_lme4.json")
