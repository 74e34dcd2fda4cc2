# lme4 reference for tests/lmm/slow_scoring.csv (one voxel of an lme4 audit: 120 subjects,
# 15% seen twice, y ~ age + time + (1 | subject), REML): best of bobyqa and Nelder_Mead.
# Run from the repository root: Rscript tests/lmm/make_slow_scoring.R
# (R 4.2.2, lme4 1.1-31, jsonlite 1.8.4)
suppressMessages({library(lme4); library(jsonlite)})
d <- read.csv("tests/lmm/slow_scoring.csv")
fits <- lapply(c("bobyqa", "Nelder_Mead"), function(opt)
  lmer(y ~ age + time + (1 | subject), data = d, REML = TRUE,
       control = lmerControl(optimizer = opt)))
m <- fits[[which.max(sapply(fits, function(f) as.numeric(logLik(f))))]]
out <- list(logLik = as.numeric(logLik(m)), theta = unname(getME(m, "theta")),
            sigma2 = sigma(m)^2, beta = unname(fixef(m)))
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE), "tests/lmm/slow_scoring_lme4.json")
