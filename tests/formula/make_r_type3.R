# lmerTest's type III anova for the formulas of tests/formula/test_type3_r.py.
#
#   python3 tests/formula/make_type3_data.py && Rscript tests/formula/make_r_type3.R
#   (from the repository root; Debian: r-cran-lme4 r-cran-lmertest r-cran-jsonlite)
#
# For every formula (y standing for the responses y1, y2, y3 of type3_data.csv, and y1 with
# every 7th row missing, as a voxel with missing data: lmer drops those rows), REML:
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
  "y ~ 0 + group + group:sex + (1 | subject)",
  # lmerTest builds these in treatment coding and maps them to the model's coding
  "y ~ C(group, sum) + age + (1 | subject)",
  "y ~ C(group, helmert) * time + (1 | subject)",
  "y ~ C(site, contr.SAS) + C(sex, sum) * group + (1 | subject)",
  "y ~ C(group, poly) * time + age + (1 | subject)",
  # one term: anova tests type I (sequential) rows
  "y ~ group + (1 | subject)",
  "y ~ C(site, sum) + (1 | subject)"
)
cases <- list()
for (f in formulas) {
  fits <- lapply(c("y1", "y2", "y3", "y1 holes"), function(y) {
    dd <- d
    dd$y <- d[[sub(" holes", "", y)]]
    if (grepl("holes", y)) dd$y[seq(7, nrow(dd), by = 7)] <- NA
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

# A fixed part of one term, with missing data: anova tests type I rows, which follow each
# fit's own rows of X (lmer drops the rows whose y is NA).  A within-subject factor with a
# random slope (two scans per condition), three responses each missing 15 rows: written to
# type1_data.csv (made here, with R's generator) and their anova tables to r_type1.json.
set.seed(13)
n_sub <- 40
t1 <- data.frame(subject = rep(sprintf("s%02d", seq_len(n_sub)), each = 6),
                 cond = rep(c("a", "a", "b", "b", "c", "c"), n_sub))
id <- rep(seq_len(n_sub), each = 6)
for (k in 1:3) {
  u <- cbind(rnorm(n_sub, sd = 1), rnorm(n_sub, sd = 0.8), rnorm(n_sub, sd = 1.2))
  y <- 10 + 0.4 * (t1$cond == "b") + 0.2 * (t1$cond == "c") + u[id, 1] +
    u[id, 2] * (t1$cond == "b") + u[id, 3] * (t1$cond == "c") + rnorm(nrow(t1), sd = 0.5)
  y[sample(nrow(t1), 15)] <- NA
  t1[[paste0("y", k)]] <- round(y, 6)
}
write.csv(t1, file.path(folder, "type1_data.csv"), row.names = FALSE, quote = FALSE)
t1 <- read.csv(file.path(folder, "type1_data.csv"), stringsAsFactors = TRUE)
f1 <- "y ~ cond + (1 + cond | subject)"
tables <- lapply(c("y1", "y2", "y3"), function(y) {
  dd <- t1
  dd$y <- t1[[y]]
  m <- lmerTest::lmer(as.formula(f1), data = dd, REML = TRUE,
                      control = lmerControl(optimizer = "bobyqa",
                                            optCtrl = list(rhoend = 1e-10, maxfun = 1e5)))
  a <- anova(m)
  list(term = I(rownames(a)), F = I(a[["F value"]]), NumDF = I(a[["NumDF"]]),
       DenDF = I(a[["DenDF"]]), p = I(a[["Pr(>F)"]]), logLik = as.numeric(logLik(m)),
       singular = isSingular(m), rows = I(lapply(seq_len(2), function(i)
         I(unname(lmerTest:::get_contrasts_type3(m)$cond[i, ])))))
})
writeLines(toJSON(list(formula = f1, anova = tables, R = R.version.string,
                       lme4 = as.character(packageVersion("lme4")),
                       lmerTest = as.character(packageVersion("lmerTest"))),
                  auto_unbox = TRUE, digits = NA, pretty = TRUE),
           file.path(folder, "r_type1.json"))
