# lme4 reference for tests/lmm/nested_ladder.csv: one voxel of a nested-design audit
# (y ~ age + sex + (1 | site/subject), 151 observed rows, age varying within subjects) whose
# profiled log-likelihood has two maxima along the subject theta (site on zero): near lme4's
# start (theta 1.07) and far from it (theta 14), which every lme4 optimiser reaches.
# REML and ML, best of the default optimiser, bobyqa and Nelder_Mead (tight tolerances).
# Run from the repository root: Rscript tests/lmm/make_nested_ladder.R
# (R 4.2.2, lme4 1.1-31, jsonlite 1.8.4)
suppressMessages({library(lme4); library(jsonlite)})
d <- read.csv("tests/lmm/nested_ladder.csv")
controls <- list(default = lmerControl(),
                 bobyqa = lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-10)),
                 Nelder_Mead = lmerControl(optimizer = "Nelder_Mead",
                                           optCtrl = list(FtolAbs = 1e-12, FtolRel = 1e-12)))
out <- list()
for (method in c("REML", "ML")) {
  fits <- lapply(controls, function(ctrl)
    suppressMessages(lmer(y ~ age + sex + (1 | site/subject), data = d,
                          REML = method == "REML", control = ctrl)))
  ll <- sapply(fits, function(f) as.numeric(logLik(f)))
  m <- fits[[which.max(ll)]]
  vc <- as.data.frame(VarCorr(m))
  out[[method]] <- list(logLik = max(ll), logLik_by_optimizer = as.list(ll),
                        theta = unname(getME(m, "theta")), sigma2 = sigma(m)^2,
                        beta = unname(fixef(m)),
                        var_subject_site = vc$vcov[vc$grp == "subject:site"],
                        var_site = vc$vcov[vc$grp == "site"], n = nrow(d))
}
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE),
           "tests/lmm/nested_ladder_lme4.json")
