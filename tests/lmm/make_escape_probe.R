# lme4/lmerTest reference for tests/lmm/escape_probe.csv: one voxel of a cohort audit
# (y ~ age + sex + (1 + time | subject) + (1 | site) + (1 | rater), ML, 442 observed rows
# of 452; a site reduced to one subject) where mpiblmm's rank probe moved the fit onto a
# rank-one D_subject and the escape's single probe at 0.01 missed lme4's interior optimum
# (L22 = 0.006): logLik 3e-7 below lme4's, status singular, age's df 371 against 108.5.
# Best of bobyqa, nloptwrap and Nelder_Mead with tight tolerances; lmerTest's
# Satterthwaite df at that fit.
# Run from the repository root: Rscript tests/lmm/make_escape_probe.R
suppressMessages({library(lme4); library(lmerTest); library(jsonlite)})
d <- read.csv("tests/lmm/escape_probe.csv")
controls <- list(
  bobyqa = lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12)),
  nloptwrap = lmerControl(optimizer = "nloptwrap",
                          optCtrl = list(xtol_abs = 1e-12, ftol_abs = 1e-14, maxeval = 1e5)),
  Nelder_Mead = lmerControl(optimizer = "Nelder_Mead",
                            optCtrl = list(FtolAbs = 1e-14, FtolRel = 1e-14, maxfun = 1e5)))
fits <- lapply(controls, function(ctrl)
  suppressWarnings(lmerTest::lmer(y ~ age + sex + (1 + time | subject) + (1 | site) + (1 | rater),
                                  data = d, REML = FALSE, control = ctrl)))
ll <- sapply(fits, function(f) as.numeric(logLik(f)))
m <- fits[[which.max(ll)]]
co <- summary(m)$coefficients
out <- list(logLik = max(ll), logLik_each = as.list(ll), singular = isSingular(m),
            theta = unname(getME(m, "theta")), beta = unname(fixef(m)),
            df_age = co["age", "df"], t_age = co["age", "t value"], n = nrow(d),
            versions = list(R = paste(R.version$major, R.version$minor, sep = "."),
                            lme4 = as.character(packageVersion("lme4")),
                            lmerTest = as.character(packageVersion("lmerTest"))))
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE),
           "tests/lmm/escape_probe_lme4.json")
