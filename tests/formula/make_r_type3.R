# lmerTest's type III anova for the formulas of tests/formula/test_type3_r.py.
#
#   python3 tests/formula/make_type3_data.py && Rscript tests/formula/make_r_type3.R
#   (from the repository root; Debian: r-cran-lme4 r-cran-lmertest r-cran-jsonlite)
#
# For every formula (y standing for the responses y1, y2, y3 of type3_data.csv), REML:
# lmerTest's type III hypothesis matrices (lmerTest:::get_contrasts_type3, what anova()
# tests by default) of every term, and anova()'s F, NumDF, DenDF and Pr(>F) (Satterthwaite)
# per response.  Written to tests/formula/r_type3.json.
suppressPackageStartupMessages({library(lme4); library(lmerTest); library(jsonlite)})
folder <- "tests/formula"
d <- read.csv(file.path(folder, "type3_data.csv"), stringsAsFactors = TRUE)
formulas <- c(
  "y ~ age + sex * group + time + (1 | subject)",
  "y ~ sex * group * time + (1 | subject)",
  "y ~ group * site + age + (1 | subject)",
  "y ~ group * time + site + (1 | subject)",
  "y ~ 0 + group + group:sex + (1 | subject)"
)
cases <- list()
for (f in formulas) {
  fits <- lapply(c("y1", "y2", "y3"), function(y) {
    dd <- d
    dd$y <- d[[y]]
    lmerTest::lmer(as.formula(f), data = dd, REML = TRUE,
                   control = lmerControl(optimizer = "bobyqa",
                                         optCtrl = list(rhoend = 1e-10, maxfun = 1e5)))
  })
  L <- lmerTest:::get_contrasts_type3(fits[[1]])
  hyp <- lapply(L, function(m) lapply(seq_len(nrow(m)), function(i) I(unname(m[i, ]))))
  tables <- lapply(fits, function(m) {
    a <- anova(m)   # type III, Satterthwaite
    list(term = I(rownames(a)), F = I(a[["F value"]]), NumDF = I(a[["NumDF"]]),
         DenDF = I(a[["DenDF"]]), p = I(a[["Pr(>F)"]]), logLik = as.numeric(logLik(m)))
  })
  cases[[length(cases) + 1]] <- list(formula = f, coefficients = I(colnames(model.matrix(fits[[1]]))),
                                     hypotheses = hyp, anova = tables)
}
out <- list(cases = cases, R = R.version.string,
            lme4 = as.character(packageVersion("lme4")),
            lmerTest = as.character(packageVersion("lmerTest")))
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE),
           file.path(folder, "r_type3.json"))
